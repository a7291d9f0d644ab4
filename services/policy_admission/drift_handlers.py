"""Policy drift's edges: the periodic comparison, the API's questions and the operator's actions.

Every ``MC_POLICY_DRIFT_INTERVAL`` seconds (600 by default) each replica compares the sandbox and
production of every tenant that has policy of its own, from what it holds in memory (no I/O
besides the record). Replicas that compare at once decide the same thing: the record is
idempotent by fingerprint, and a concurrent append is retried on the new state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from libs.contracts.policy import ENVIRONMENTS, Environment
from libs.errors import MissionControlError
from libs.eventbus.repository import EventMeta, Repository
from libs.eventbus.store import EventStore
from services.policy_admission import drift
from services.policy_admission.tenant_bundles import TenantPolicies

log = structlog.get_logger("policy_admission.drift")


class DriftWatch:
    """Compares each tenant's environments, records drift, and answers whether it blocks."""

    def __init__(self, store: EventStore, tenants: TenantPolicies, interval_s: float) -> None:
        self.repository = Repository(store, drift.DRIFT, max_retries=4)
        self.tenants = tenants
        self.interval_s = interval_s

    def snapshots(self, tenant_id: str) -> dict[str, dict[str, str]]:
        """Each environment's dimension hashes, as this replica decides now."""
        exceptions = tuple(w.as_dict() for w in self.tenants.exceptions_for(tenant_id))
        settings = self.tenants.settings_for(tenant_id)
        out: dict[str, dict[str, str]] = {}
        for environment in ENVIRONMENTS:
            bundle = self.tenants.bundle_for(tenant_id, environment)
            inputs = drift.EnvironmentInputs(bundle.digest, bundle.data, settings, exceptions)
            out[environment] = drift.snapshot(tenant_id, inputs)
        return out

    async def check(self, tenant_id: str, actor: str = "service:policy-admission") -> drift.Drift:
        """Compare the tenant's environments now and record what changed; the drift state."""
        snapshots = self.snapshots(tenant_id)
        state, stored = await self.repository.execute(
            tenant_id,
            drift.DRIFT_ENTITY,
            lambda s: drift.check(s, snapshots),
            EventMeta(correlation_id=f"drift:{tenant_id}", actor=actor),
        )
        for env in stored:
            log.info("policy_drift.recorded", tenant_id=tenant_id, event_type=env.event_type)
        return state

    async def run(self) -> None:
        """Compare every tenant with policy of its own, every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)  # the comparison's period, not a synchronisation
            for tenant_id in self.tenants.tenant_ids():
                try:
                    await self.check(tenant_id)
                except MissionControlError as exc:
                    # One tenant's failure (a conflict that outlived its retries, the store
                    # briefly gone) must not stop the others' comparisons; the next round retries.
                    log.warning("policy_drift.check_failed", tenant_id=tenant_id, error=str(exc))

    async def blockers(self, tenant_id: str) -> list[str]:
        """Why a promotion may not go ahead because of drift, compared now (empty: it may)."""
        return drift.blockers(await self.check(tenant_id))

    async def status(self, tenant_id: str) -> dict[str, Any]:
        """``GET /v1/policy-drift``: the environments compared now, and the drift on record."""
        snapshots = self.snapshots(tenant_id)
        state = await self.repository.load(tenant_id, drift.DRIFT_ENTITY)
        return _document(snapshots, state, self.interval_s)

    async def check_now(self, tenant_id: str, actor: str) -> dict[str, Any]:
        """``POST /v1/policy-drift:check``: compare and record now rather than at the next
        period."""
        state = await self.check(tenant_id, actor)
        return _document(self.snapshots(tenant_id), state, self.interval_s)

    async def acknowledge(
        self, tenant_id: str, fingerprint: str | None, reason: str, actor: str
    ) -> dict[str, Any]:
        """``POST /v1/policy-drift:acknowledge``: accept the drift on record (audited)."""
        await self.check(tenant_id)
        state, _ = await self.repository.execute(
            tenant_id,
            drift.DRIFT_ENTITY,
            lambda s: drift.acknowledge(s, fingerprint=fingerprint, by=actor, reason=reason),
            EventMeta(correlation_id=f"drift-ack:{tenant_id}", actor=actor),
        )
        log.info("policy_drift.acknowledged", tenant_id=tenant_id, by=actor)
        return _document(self.snapshots(tenant_id), state, self.interval_s)

    async def align(self, tenant_id: str, source: Environment, actor: str) -> dict[str, Any]:
        """``POST /v1/policy-drift:align``: activate ``source``'s bundle in the other
        environment (the activation's own checks apply), then compare again."""
        target: Environment = "production" if source == "sandbox" else "sandbox"
        listing = await self.tenants.bundle_listing(tenant_id, source)
        uploaded = [b["bundle_digest"] for b in listing["bundles"]]
        digest = drift.align_source(self.snapshots(tenant_id), uploaded, source)
        # The same archive, uploaded to the target too (verified and tested again there; a
        # second upload of it records nothing), then activated with every check an activation
        # makes, an older revision than the target's included.
        archive = await self.tenants.read_archive(tenant_id, digest)
        await self.tenants.upload(tenant_id, target, archive, actor)
        # At once, without a canary: the bundle already decides in the source environment.
        await self.tenants.activate(tenant_id, target, digest, actor, immediate=True)
        log.info(
            "policy_drift.aligned", tenant_id=tenant_id, source=source, target=target, by=actor
        )
        return await self.check_now(tenant_id, actor)


def _document(
    snapshots: dict[str, dict[str, str]], state: drift.Drift, interval_s: float
) -> dict[str, Any]:
    dimensions = drift.compare(snapshots)
    return {
        "drifted": bool(dimensions),
        "dimensions": dimensions,
        "snapshots": snapshots,
        "blocking": drift.blockers(state),
        "recorded": None if state.current is None else state.current.as_dict(),
        "detections": state.detections,
        "interval_s": interval_s,
    }
