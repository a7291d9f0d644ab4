"""Promotion freeze: while an incident at or above a tenant's freeze severity is open, nothing is
promoted into the environment it happened in.

Stream ``<t>/policy/freeze-<environment>`` (category ``policy``): ``policy.freeze_started`` when
such an incident opens, ``policy.freeze_lifted`` when it is resolved and
``policy.freeze_overridden`` when an admin lets promotions through anyway, naming the incidents
and a reason. The override covers the incidents open at that moment only: one opened later
freezes again. Everything here is pure; :mod:`services.policy_admission.freeze_handlers` feeds it
the incident service's events and answers the API.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PolicyEnvironment,
    PolicyFreezeLifted,
    PolicyFreezeOverridden,
    PolicyFreezeStarted,
    Severity,
)
from libs.errors import Conflict
from libs.eventbus.repository import Aggregate, fold_with_time

DEFAULT_THRESHOLD: Severity = "high"
"""The freeze severity of a tenant that set none (``freeze_min_severity`` in its settings)."""

_RANK: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def freeze_entity(environment: PolicyEnvironment) -> str:
    """The entity id of an environment's freeze (its stream is ``<t>/policy/freeze-<env>``)."""
    return f"freeze-{environment}"


def at_or_above(severity: str, threshold: str) -> bool:
    """Whether ``severity`` is at least ``threshold`` (low < medium < high < critical)."""
    return _RANK.get(severity, -1) >= _RANK[threshold]


@dataclass(frozen=True)
class FreezingIncident:
    """An open incident that froze the environment; ``overridden_by`` once an admin let
    promotions through despite it."""

    incident_id: str
    severity: str
    title: str
    opened_at: datetime
    overridden_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The API's view."""
        return {
            "incident_id": self.incident_id,
            "severity": self.severity,
            "title": self.title,
            "opened_at": self.opened_at.isoformat(),
            "overridden_by": self.overridden_by,
        }


@dataclass(frozen=True)
class Override:
    """One audited override: who, why, when, and the incidents it covered."""

    by: str
    reason: str
    at: datetime
    incident_ids: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """The API's view."""
        return {
            "by": self.by,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "incident_ids": list(self.incident_ids),
        }


@dataclass(frozen=True)
class Freeze:
    """One tenant's freeze in one environment."""

    open: tuple[FreezingIncident, ...] = ()
    seen: frozenset[str] = frozenset()
    """Every incident that ever froze this environment: a redelivered opening adds nothing."""
    overrides: tuple[Override, ...] = ()

    @property
    def frozen_by(self) -> tuple[FreezingIncident, ...]:
        """The open incidents no override covers; the environment is frozen while any is."""
        return tuple(i for i in self.open if i.overridden_by is None)


def evolve(state: Freeze, event: DomainEvent, occurred_at: datetime) -> Freeze:
    """``state`` after ``event``."""
    if isinstance(event, PolicyFreezeStarted):
        incident = FreezingIncident(event.incident_id, event.severity, event.title, occurred_at)
        return replace(state, open=(*state.open, incident), seen=state.seen | {event.incident_id})
    if isinstance(event, PolicyFreezeLifted):
        return replace(
            state, open=tuple(i for i in state.open if i.incident_id != event.incident_id)
        )
    if isinstance(event, PolicyFreezeOverridden):
        covered = set(event.incident_ids)
        return replace(
            state,
            open=tuple(
                replace(i, overridden_by=event.by) if i.incident_id in covered else i
                for i in state.open
            ),
            overrides=(
                *state.overrides,
                Override(event.by, event.reason, occurred_at, tuple(event.incident_ids)),
            ),
        )
    return state


FREEZE = Aggregate[Freeze](
    category="policy", initial=lambda t, i: Freeze(), fold=fold_with_time(evolve)
)


# --- decisions (pure) ----------------------------------------------------------------------------


def incident_opened(
    state: Freeze,
    *,
    environment: PolicyEnvironment,
    incident_id: str,
    severity: Severity,
    title: str,
    threshold: Severity,
) -> list[DomainEvent]:
    """``policy.freeze_started`` for an incident at or above ``threshold``; nothing for a lower
    one or one already seen."""
    if incident_id in state.seen or not at_or_above(severity, threshold):
        return []
    return [
        PolicyFreezeStarted(
            environment=environment,
            incident_id=incident_id,
            severity=severity,
            threshold=threshold,
            title=title,
        )
    ]


def incident_resolved(
    state: Freeze, *, environment: PolicyEnvironment, incident_id: str, by: str
) -> list[DomainEvent]:
    """``policy.freeze_lifted`` if the incident froze this environment and is still open."""
    if not any(i.incident_id == incident_id for i in state.open):
        return []
    return [PolicyFreezeLifted(environment=environment, incident_id=incident_id, resolved_by=by)]


def override(
    state: Freeze, *, environment: PolicyEnvironment, by: str, reason: str
) -> list[DomainEvent]:
    """``policy.freeze_overridden`` covering every incident freezing the environment now;
    409 ``freeze_not_active`` when nothing freezes it."""
    blocking = state.frozen_by
    if not blocking:
        raise Conflict(f"freeze_not_active: promotions into {environment} are not frozen")
    return [
        PolicyFreezeOverridden(
            environment=environment,
            incident_ids=[i.incident_id for i in blocking],
            by=by,
            reason=reason,
        )
    ]


def blockers(state: Freeze, environment: PolicyEnvironment) -> list[str]:
    """Why a promotion into ``environment`` may not go ahead now (empty: it may), one line per
    freezing incident, each starting ``promotion_frozen:``."""
    return [
        f"promotion_frozen: incident {i.incident_id} ({i.severity}) is open in {environment}: "
        f"{i.title}"
        for i in state.frozen_by
    ]


def view(state: Freeze, environment: PolicyEnvironment, threshold: Severity) -> dict[str, Any]:
    """``GET /v1/policy-freeze``'s entry for one environment."""
    return {
        "environment": environment,
        "frozen": bool(state.frozen_by),
        "threshold": threshold,
        "incidents": [i.as_dict() for i in state.open],
        "overrides": [o.as_dict() for o in state.overrides],
    }
