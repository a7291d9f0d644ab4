"""Admission's NATS request routes: ``mc.rpc.admission.admit`` and ``mc.rpc.admission.policies``."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from libs.eventbus.rpc import RpcServer
from services.policy_admission.handlers import AdmissionHandler

RPC_SERVICE = "admission"


def rpc_server(nc: NATS, handler: AdmissionHandler) -> RpcServer:
    """An (unstarted) RPC server routing ``admit`` and ``policies`` to ``handler``."""
    server = RpcServer(nc, RPC_SERVICE)

    async def admit(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return await handler.admit(payload.get("tenant_id"), payload, headers)

    async def policies(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return handler.policies()

    server.route("admit", admit)
    server.route("policies", policies)
    return server
