"""The cost service's requests: ``mc.rpc.cost.set_prices`` and ``mc.rpc.cost.prices``.

Both take the ``tenant_id`` the gateway put in the body (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict

from libs.contracts.envelope import TenantId
from libs.eventbus.rpc import Meta, RpcServer
from services.cost.handlers import CostHandlers

SERVICE = "cost"
DEFAULT_ACTOR = "cost-api"
MAX_ACTOR = 200


class PricesRequest(BaseModel):
    """``prices``: the tenant whose table to read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant_id: TenantId


class SetPricesRequest(PricesRequest):
    """``set_prices``: the tenant's complete override list (validated by the domain)."""

    prices: Any = None
    actor: Any = None

    def actor_or_default(self) -> str:
        """The named actor when it is a sensible string, else :data:`DEFAULT_ACTOR`."""
        a = self.actor
        return a if isinstance(a, str) and 0 < len(a) <= MAX_ACTOR else DEFAULT_ACTOR


def build_rpc_server(nc: NATS, handlers: CostHandlers) -> RpcServer:
    """An :class:`RpcServer` with the cost routes registered (call ``start`` to serve)."""
    server = RpcServer(nc, SERVICE)

    @server.handler("set_prices")
    async def set_prices(body: SetPricesRequest, meta: Meta) -> dict[str, Any]:
        """Publish the tenant's price overrides as a new table version."""
        return await handlers.set_prices(
            body.tenant_id,
            body.prices,
            correlation_id=meta.correlation_id,
            actor=body.actor_or_default(),
            trace_context=meta.trace_context,
        )

    @server.handler("prices")
    async def prices(body: PricesRequest) -> dict[str, Any]:
        """The tenant's current price table."""
        return await handlers.prices(body.tenant_id)

    return server
