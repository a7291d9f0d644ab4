"""Admission's NATS request routes: ``mc.rpc.admission.admit`` and ``mc.rpc.admission.policies``."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from libs.contracts.envelope import TenantId
from libs.contracts.subjects import events_filter
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import Headers, RpcServer
from services.policy_admission.domain import AdmitRequest
from services.policy_admission.handlers import AdmissionHandler

RPC_SERVICE = "admission"
STEPS_DURABLE = "admission-steps"


def steps_consumer_spec(durable: str = STEPS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of ``run.step_recorded`` that judges marked steps (tests narrow
    durable and tenant)."""
    return ConsumerSpec(
        durable=durable, filter_subjects=(events_filter("run.step_recorded", tenant_id),)
    )


class AdmitCall(AdmitRequest):
    """``admit``: the step to decide on, with the ``tenant_id`` the gateway sets."""

    tenant_id: TenantId


def rpc_server(nc: NATS, handler: AdmissionHandler) -> RpcServer:
    """An (unstarted) RPC server routing ``admit`` and ``policies`` to ``handler``."""
    server = RpcServer(nc, RPC_SERVICE)

    # The hot path: served on bare nats-py, FastStream's per-message cost measured too high for
    # it (docs/benchmarks.md); parsing, answers and bounds are the same as on every route.
    @server.handler("admit", hot=True)
    async def admit(body: AdmitCall, headers: Headers) -> dict[str, Any]:
        """Decide whether a step may run; answered once the decision is durable."""
        return await handler.admit_parsed(body.tenant_id, body, headers)

    @server.handler("policies")
    async def policies(body: dict[str, Any]) -> dict[str, Any]:
        """The active bundle's digest and every policy's metadata."""
        return handler.policies()

    return server
