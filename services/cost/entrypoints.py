"""The cost service's requests: ``mc.rpc.cost.set_prices`` and ``mc.rpc.cost.prices``.

Both take the ``tenant_id`` the gateway put in the body (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from pydantic import TypeAdapter, ValidationError

from libs.contracts import TraceContext, new_uuid7
from libs.contracts.envelope import TenantId
from libs.errors import InvalidInput
from libs.eventbus.rpc import RpcServer
from services.cost.handlers import CostHandlers

SERVICE = "cost"
DEFAULT_ACTOR = "cost-api"

_tenant_adapter: TypeAdapter[str] = TypeAdapter(TenantId)


def tenant_of(payload: dict[str, Any]) -> str:
    """The request's tenant id, validated against the tenant alphabet."""
    try:
        return _tenant_adapter.validate_python(payload.get("tenant_id"))
    except ValidationError:
        raise InvalidInput("tenant_id is missing or not a valid tenant id") from None


def _trace(headers: dict[str, str]) -> TraceContext:
    return TraceContext(
        traceparent=headers.get("traceparent"), tracestate=headers.get("tracestate")
    )


def build_rpc_server(nc: NATS, handlers: CostHandlers) -> RpcServer:
    """An :class:`RpcServer` with the cost routes registered (call ``start`` to serve)."""
    server = RpcServer(nc, SERVICE)

    async def set_prices(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        tenant = tenant_of(payload)
        actor = payload.get("actor")
        return await handlers.set_prices(
            tenant,
            payload.get("prices"),
            correlation_id=headers.get("Mc-Correlation-Id") or str(new_uuid7()),
            actor=actor if isinstance(actor, str) and 0 < len(actor) <= 200 else DEFAULT_ACTOR,
            trace_context=_trace(headers),
        )

    async def prices(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return await handlers.prices(tenant_of(payload))

    server.route("set_prices", set_prices)
    server.route("prices", prices)
    return server
