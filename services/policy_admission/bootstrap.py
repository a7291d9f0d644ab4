"""Wiring of the policy-admission service into the shared service host."""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter

from libs.contracts import utcnow
from libs.eventbus.consumer import BatchEventConsumer
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import RpcClient, RpcServer
from libs.runtime.service_host import CONSUMER_STOP_TIMEOUT_S, ServiceContext, run_service
from services.policy_admission.bundle import PolicyBundle, load_bundle
from services.policy_admission.drift_handlers import DriftWatch
from services.policy_admission.entrypoints import (
    incidents_consumer_spec,
    rpc_server,
    steps_consumer_spec,
)
from services.policy_admission.freeze_handlers import Freezes
from services.policy_admission.handlers import AdmissionHandler, activate_bundle
from services.policy_admission.simulation_jobs import AUDIT, AUDIT_TIMEOUT_S, SimulationJobs
from services.policy_admission.tenant_bundles import TenantPolicies

log = structlog.get_logger("policy_admission")


class PolicyAdmissionService:
    """Loads and compiles the policy bundle, announces it, then answers admission requests.

    A bundle that does not compile fails :meth:`start` (and so the process) with
    :class:`~services.policy_admission.bundle.BundleError`: admitting with no policies would
    admit everything.

    It also consumes ``run.step_recorded`` to judge the steps recorded against the rules
    (``admission_required``); ``steps_spec`` defaults to the production consumer, tests pass
    one with their own durable name and tenant filter. It consumes ``incident.opened`` and
    ``incident.resolved`` to keep the promotion freeze (``incidents_spec`` likewise).
    """

    name: str = "policy-admission"

    def __init__(
        self, steps_spec: ConsumerSpec | None = None, incidents_spec: ConsumerSpec | None = None
    ) -> None:
        self.bundle: PolicyBundle | None = None
        self.handler: AdmissionHandler | None = None
        self._server: RpcServer | None = None
        self.steps_spec = steps_spec or steps_consumer_spec()
        self.incidents_spec = incidents_spec or incidents_consumer_spec()
        self.freezes: Freezes | None = None
        self.incidents: BatchEventConsumer | None = None
        self._incidents_task: asyncio.Task[None] | None = None
        self.drift: DriftWatch | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self.consumer: BatchEventConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.tenants: TenantPolicies | None = None
        self._follow: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._deliver: asyncio.Task[None] | None = None
        self.simulations: SimulationJobs | None = None
        self._simulations: asyncio.Task[None] | None = None

    async def start(self, ctx: ServiceContext) -> None:
        """Compile the bundle, record its activation if new, and start serving requests."""
        self.bundle = load_bundle(ctx.settings)
        # Tenants' own bundles and settings, loaded before the first request and followed.
        self.tenants = TenantPolicies(ctx.store, self.bundle)
        await self.tenants.start()
        self._follow = asyncio.create_task(self.tenants.follow(), name="admission-policy-follow")
        ctx.tasks.append(self._follow)
        self._sweep = asyncio.create_task(
            self.tenants.sweep(utcnow), name="admission-exception-sweep"
        )
        ctx.tasks.append(self._sweep)
        # Reload reports to webhook subscribers, from the durable outbox.
        self._deliver = asyncio.create_task(
            self.tenants.webhooks.run(), name="admission-policy-webhooks"
        )
        ctx.tasks.append(self._deliver)
        self.handler = AdmissionHandler(
            ctx.store, self.bundle, registry=ctx.registry, tenants=self.tenants
        )
        appended = await activate_bundle(ctx.store, self.bundle)
        log.info(
            "policy_bundle.loaded",
            bundle_dir=str(self.bundle.root),
            bundle_digest=self.bundle.digest,
            policies=[p.policy_id for p in self.bundle.policies],
            activation_recorded=appended,
        )
        self.consumer = BatchEventConsumer(ctx.js, self.steps_spec, self.handler.judge_steps)
        self._task = asyncio.create_task(self.consumer.run(), name="admission-steps")
        ctx.tasks.append(self._task)
        self.freezes = Freezes(ctx.store, self.tenants.get_settings)
        self.incidents = BatchEventConsumer(ctx.js, self.incidents_spec, self.freezes.on_incidents)
        self._incidents_task = asyncio.create_task(self.incidents.run(), name="admission-freeze")
        ctx.tasks.append(self._incidents_task)
        self.drift = DriftWatch(ctx.store, self.tenants, ctx.settings.policy_drift_interval_s)
        self._drift_task = asyncio.create_task(self.drift.run(), name="admission-drift")
        ctx.tasks.append(self._drift_task)
        audit = RpcClient(ctx.nc, default_timeout=AUDIT_TIMEOUT_S)
        # Whole answers only: the bus lets this service send its two reads, not ask for the
        # parts of a large answer; a page too large answers too_large and the job asks for less.
        self.simulations = SimulationJobs(
            ctx.store,
            self.tenants,
            lambda method, payload: audit.call(AUDIT, method, payload, chunked=False),
        )
        self._simulations = asyncio.create_task(
            self.simulations.follow(), name="admission-simulations"
        )
        ctx.tasks.append(self._simulations)
        self._server = rpc_server(
            ctx.nc,
            self.handler,
            self.tenants,
            freezes=self.freezes,
            drift=self.drift,
            jobs=self.simulations,
        )
        await self._server.start()

    async def stop(self) -> None:
        """Stop taking requests (in-flight ones finish), then stop judging steps."""
        if self._server is not None:
            await self._server.stop()
            self._server = None
        for consumer in (self.consumer, self.incidents):
            if consumer is not None:
                consumer.stop()
        running = {t for t in (self._task, self._incidents_task) if t is not None and not t.done()}
        if running:
            # Cancelled by the host with the rest of ctx.tasks if still running after this.
            await asyncio.wait(running, timeout=CONSUMER_STOP_TIMEOUT_S)
        if self._follow is not None:
            self._follow.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
        if self._drift_task is not None:
            self._drift_task.cancel()
        if self._deliver is not None:
            self._deliver.cancel()
        if self._simulations is not None:
            self._simulations.cancel()
        if self.simulations is not None:
            await self.simulations.stop()

    def router(self) -> APIRouter | None:
        """No HTTP routes: admission is reached through the gateway over NATS."""
        return None

    def ready(self) -> bool:
        """Ready once the bundle is compiled, the request routes are subscribed and the step
        consumer is fetching."""
        return (
            self._server is not None
            and self.consumer is not None
            and self.consumer.running
            and self._task is not None
            and not self._task.done()
            and self.incidents is not None
            and self.incidents.running
            and self._incidents_task is not None
            and not self._incidents_task.done()
            and self._follow is not None
            and not self._follow.done()
        )


def main() -> None:
    """Run the policy-admission service until SIGTERM."""
    run_service(PolicyAdmissionService())
