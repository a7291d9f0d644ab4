"""The promotion freeze's edges: the incident service's events in, the API's questions out.

A durable consumer of ``incident.opened`` and ``incident.resolved`` turns each into the freeze
decisions of :mod:`services.policy_admission.freeze`; the tenant's ``freeze_min_severity``
setting is read from the store as each incident opens, so a change applies to the next incident
without a restart. Redelivered incident events add nothing (the freeze remembers what it saw).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, cast

import structlog

from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import IncidentOpened, IncidentResolved, PolicyEnvironment, Severity
from libs.contracts.policy import ENVIRONMENTS
from libs.contracts.registry import decode
from libs.eventbus.repository import EventMeta, Repository
from libs.eventbus.store import EventStore
from services.policy_admission import freeze

log = structlog.get_logger("policy_admission.freeze")

SettingsReader = Callable[[str], Awaitable[dict[str, Any]]]
"""The tenant's settings document (``GET /v1/policy-settings``'s answer)."""


class Freezes:
    """Keeps every tenant's freeze per environment, and answers whether a promotion may go."""

    def __init__(self, store: EventStore, settings_of: SettingsReader) -> None:
        self.repository = Repository(store, freeze.FREEZE, max_retries=4)
        self._settings_of = settings_of

    async def threshold(self, tenant_id: str) -> Severity:
        """The tenant's freeze severity (``freeze_min_severity``, default ``high``)."""
        document = await self._settings_of(tenant_id)
        value = (document.get("settings") or {}).get("freeze_min_severity")
        return cast(Severity, value) if value else freeze.DEFAULT_THRESHOLD

    async def on_incidents(self, envelopes: Sequence[EventEnvelope]) -> None:
        """``BatchEventConsumer`` handler of ``incident.opened`` and ``incident.resolved``."""
        for env in envelopes:
            event = decode(env)
            meta = EventMeta(correlation_id=str(env.event_id), actor="service:incident")
            if isinstance(event, IncidentOpened):
                threshold = await self.threshold(env.tenant_id)
                decide = partial(
                    freeze.incident_opened,
                    environment=event.environment,
                    incident_id=event.incident_id,
                    severity=event.severity,
                    title=event.title,
                    threshold=threshold,
                )
                _, stored = await self.repository.execute(
                    env.tenant_id, freeze.freeze_entity(event.environment), decide, meta
                )
                if stored:
                    log.info(
                        "promotion_freeze.started",
                        tenant_id=env.tenant_id,
                        environment=event.environment,
                        incident_id=event.incident_id,
                        severity=event.severity,
                    )
            elif isinstance(event, IncidentResolved):
                # The resolution does not say where the incident happened: the environment
                # whose freeze holds it lifts it, the other decides nothing.
                for environment in ENVIRONMENTS:
                    await self.repository.execute(
                        env.tenant_id,
                        freeze.freeze_entity(environment),
                        partial(
                            freeze.incident_resolved,
                            environment=environment,
                            incident_id=event.incident_id,
                            by=event.by,
                        ),
                        meta,
                    )

    async def state(self, tenant_id: str, environment: PolicyEnvironment) -> freeze.Freeze:
        """The tenant's freeze in ``environment``, as stored."""
        return await self.repository.load(tenant_id, freeze.freeze_entity(environment))

    async def blockers(self, tenant_id: str, environment: PolicyEnvironment) -> list[str]:
        """Why a promotion into ``environment`` may not go ahead now (empty: it may)."""
        return freeze.blockers(await self.state(tenant_id, environment), environment)

    async def status(self, tenant_id: str) -> dict[str, Any]:
        """``GET /v1/policy-freeze``: each environment's freeze, incidents and overrides."""
        threshold = await self.threshold(tenant_id)
        return {
            "environments": [
                freeze.view(await self.state(tenant_id, e), e, threshold) for e in ENVIRONMENTS
            ]
        }

    async def override(
        self, tenant_id: str, environment: PolicyEnvironment, reason: str, actor: str
    ) -> dict[str, Any]:
        """``POST /v1/policy-freeze/{environment}:override``: let promotions through despite
        the incidents open now; recorded with who and why."""
        await self.repository.execute(
            tenant_id,
            freeze.freeze_entity(environment),
            partial(freeze.override, environment=environment, by=actor, reason=reason),
            EventMeta(correlation_id=f"freeze-override:{tenant_id}:{environment}", actor=actor),
        )
        log.info(
            "promotion_freeze.overridden", tenant_id=tenant_id, environment=environment, by=actor
        )
        return freeze.view(
            await self.state(tenant_id, environment), environment, await self.threshold(tenant_id)
        )
