"""Wiring of the policy-admission service into the shared service host."""

from __future__ import annotations

import structlog
from fastapi import APIRouter

from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ServiceContext, run_service
from services.policy_admission.bundle import PolicyBundle, load_bundle
from services.policy_admission.entrypoints import rpc_server
from services.policy_admission.handlers import AdmissionHandler, activate_bundle

log = structlog.get_logger("policy_admission")


class PolicyAdmissionService:
    """Loads and compiles the policy bundle, announces it, then answers admission requests.

    A bundle that does not compile fails :meth:`start` (and so the process) with
    :class:`~services.policy_admission.bundle.BundleError`: admitting with no policies would
    admit everything.
    """

    name: str = "policy-admission"

    def __init__(self) -> None:
        self.bundle: PolicyBundle | None = None
        self.handler: AdmissionHandler | None = None
        self._server: RpcServer | None = None

    async def start(self, ctx: ServiceContext) -> None:
        """Compile the bundle, record its activation if new, and start serving requests."""
        self.bundle = load_bundle(ctx.settings)
        self.handler = AdmissionHandler(ctx.store, self.bundle, registry=ctx.registry)
        appended = await activate_bundle(ctx.store, self.bundle)
        log.info(
            "policy_bundle.loaded",
            bundle_dir=str(self.bundle.root),
            bundle_digest=self.bundle.digest,
            policies=[p.policy_id for p in self.bundle.policies],
            activation_recorded=appended,
        )
        self._server = rpc_server(ctx.nc, self.handler)
        await self._server.start()

    async def stop(self) -> None:
        """Stop taking requests (in-flight ones finish)."""
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def router(self) -> APIRouter | None:
        """No HTTP routes: admission is reached through the gateway over NATS."""
        return None

    def ready(self) -> bool:
        """Ready once the bundle is compiled and the request routes are subscribed."""
        return self._server is not None


def main() -> None:
    """Run the policy-admission service until SIGTERM."""
    run_service(PolicyAdmissionService())
