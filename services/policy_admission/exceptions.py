"""Policy exceptions: time-bound waivers of one policy for one agent or one run.

Stream ``<t>/policy/exceptions`` (category ``policy``): ``policy.exception_granted``,
``policy.exception_revoked`` and ``policy.exception_expired``. Every change also adds a row to
``policy_admission.changes``, so every replica reloads the tenant's waivers with its bundles and
settings (:class:`~services.policy_admission.tenant_bundles.TenantPolicies`) and admission looks
them up in memory.

A waiver applies to a decision made strictly before its ``expires_at``, by the decision's own
clock: the sweeper that records ``policy.exception_expired`` only closes the record, it never
decides when a waiver stops applying.

Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PolicyExceptionExpired,
    PolicyExceptionGranted,
    PolicyExceptionRevoked,
    Reason,
)
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.repository import Aggregate, fold_with_time

EXCEPTIONS_ENTITY = "exceptions"
MAX_TTL = timedelta(days=90)
MAX_OPEN = 1000
UNWAIVABLE = frozenset({"run_state", "agent_state"})
"""Policies no waiver may cover: ``run_state`` denies steps of a run already stopped,
``agent_state`` runs of a registered agent disabled, or not governed in production."""

Status = Literal["open", "expired", "revoked"]


@dataclass(frozen=True)
class Waiver:
    """One exception as recorded; ``status`` says whether it is still open."""

    exception_id: str
    policy_id: str
    agent_id: str | None
    run_id: str | None
    reason: str
    granted_by: str
    granted_at: datetime
    expires_at: datetime
    status: Status = "open"
    closed_by: str | None = None
    closed_at: datetime | None = None
    """When it was revoked or recorded as expired (simulation needs what was open when)."""

    def applies(self, policy_id: str, agent_id: str | None, run_id: str, at: datetime) -> bool:
        """Whether this waiver covers a denial of ``policy_id`` decided at ``at``."""
        if self.status != "open" or at >= self.expires_at or self.policy_id != policy_id:
            return False
        if self.run_id is not None:
            return self.run_id == run_id
        return self.agent_id is not None and self.agent_id == agent_id

    def as_dict(self) -> dict[str, Any]:
        """The waiver as the API shows it."""
        return {
            "exception_id": self.exception_id,
            "policy_id": self.policy_id,
            "agent_id": self.agent_id,
            "run_id": self.run_id,
            "reason": self.reason,
            "granted_by": self.granted_by,
            "granted_at": self.granted_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "status": self.status,
            "closed_by": self.closed_by,
        }


@dataclass(frozen=True)
class Exceptions:
    """A tenant's waivers, in the order granted."""

    waivers: tuple[Waiver, ...] = ()

    def get(self, exception_id: str) -> Waiver | None:
        """The waiver ``exception_id``, whatever its status."""
        return next((w for w in self.waivers if w.exception_id == exception_id), None)

    def open(self) -> tuple[Waiver, ...]:
        """The waivers neither revoked nor recorded as expired."""
        return tuple(w for w in self.waivers if w.status == "open")


def _close(
    state: Exceptions, exception_id: str, status: Status, by: str, at: datetime
) -> Exceptions:
    return Exceptions(
        tuple(
            replace(w, status=status, closed_by=by, closed_at=at)
            if w.exception_id == exception_id and w.status == "open"
            else w
            for w in state.waivers
        )
    )


def evolve(state: Exceptions, event: DomainEvent, occurred_at: datetime) -> Exceptions:
    """``state`` after ``event``."""
    if isinstance(event, PolicyExceptionGranted):
        waiver = Waiver(
            exception_id=event.exception_id,
            policy_id=event.policy_id,
            agent_id=event.agent_id,
            run_id=event.run_id,
            reason=event.reason,
            granted_by=event.granted_by,
            granted_at=occurred_at,
            expires_at=event.expires_at,
        )
        return Exceptions((*state.waivers, waiver))
    if isinstance(event, PolicyExceptionRevoked):
        return _close(state, event.exception_id, "revoked", event.revoked_by, occurred_at)
    if isinstance(event, PolicyExceptionExpired):
        return _close(state, event.exception_id, "expired", "expiry", occurred_at)
    return state


EXCEPTIONS = Aggregate[Exceptions](
    category="policy", initial=lambda t, i: Exceptions(), fold=fold_with_time(evolve)
)


# --- decisions (pure) ----------------------------------------------------------------------------


def grant(
    state: Exceptions,
    *,
    exception_id: str,
    policy_id: str,
    agent_id: str | None,
    run_id: str | None,
    reason: str,
    granted_by: str,
    expires_at: datetime,
    now: datetime,
) -> list[DomainEvent]:
    """``policy.exception_granted``; 422 for an expiry not in ``(now, now + 90 days]``, a
    waiver naming neither or both of agent and run, or an unwaivable policy. The same id with
    the same terms again records nothing; with other terms it is a 409."""
    if expires_at.tzinfo is None:
        raise InvalidInput("exception_expiry_invalid: expires_at must carry a time zone (UTC)")
    expires_at = expires_at.astimezone(UTC).replace(microsecond=0)
    existing = state.get(exception_id)
    if existing is not None:
        # A retried grant (the caller chose the id) is answered with what it recorded, even
        # after that expired; the same id for a different waiver is a conflict, not a no-op.
        asked = (policy_id, agent_id, run_id, reason, granted_by, expires_at)
        held = (
            existing.policy_id,
            existing.agent_id,
            existing.run_id,
            existing.reason,
            existing.granted_by,
            existing.expires_at,
        )
        if asked != held:
            raise Conflict(
                f"exception_id_taken: policy exception {exception_id!r} was granted with "
                "different terms; choose another id"
            )
        return []
    if expires_at <= now:
        raise InvalidInput(
            f"exception_expiry_past: expires_at {expires_at.isoformat()} is not after now "
            f"({now.isoformat(timespec='seconds')})"
        )
    if expires_at > now + MAX_TTL:
        raise InvalidInput(
            f"exception_expiry_too_far: expires_at may be at most {MAX_TTL.days} days ahead"
        )
    if (agent_id is None) == (run_id is None):
        raise InvalidInput("exception_scope_invalid: name exactly one of agent_id and run_id")
    if policy_id in UNWAIVABLE:
        raise InvalidInput(f"exception_policy_unwaivable: {policy_id!r} cannot be waived")
    if len(state.open()) >= MAX_OPEN:
        raise InvalidInput(f"exception_limit: a tenant may hold at most {MAX_OPEN} open exceptions")
    return [
        PolicyExceptionGranted(
            exception_id=exception_id,
            policy_id=policy_id,
            agent_id=agent_id,
            run_id=run_id,
            reason=reason,
            granted_by=granted_by,
            expires_at=expires_at,
        )
    ]


def revoke(
    state: Exceptions, exception_id: str, revoked_by: str, reason: str | None
) -> list[DomainEvent]:
    """``policy.exception_revoked``; 404 for an unknown id; nothing if already closed."""
    waiver = state.get(exception_id)
    if waiver is None:
        raise NotFound(f"exception_not_found: no policy exception {exception_id!r}")
    if waiver.status != "open":
        return []
    return [PolicyExceptionRevoked(exception_id=exception_id, revoked_by=revoked_by, reason=reason)]


def expire(state: Exceptions, now: datetime) -> list[DomainEvent]:
    """``policy.exception_expired`` for every open waiver whose expiry is at or before ``now``."""
    return [
        PolicyExceptionExpired(exception_id=w.exception_id, expires_at=w.expires_at)
        for w in state.open()
        if w.expires_at <= now
    ]


# --- applying them to a decision -----------------------------------------------------------------


def waiving(
    waivers: Iterable[Waiver],
    denies: Sequence[Reason],
    *,
    agent_id: str | None,
    run_id: str,
    at: datetime,
) -> tuple[str, ...] | None:
    """The ids of the waivers that cover every one of ``denies`` at ``at``, or ``None`` if any
    deny is not covered (then the decision stays a deny)."""
    if not denies:
        return None
    waivers = tuple(waivers)
    used: list[str] = []
    for reason in denies:
        match = [
            w.exception_id for w in waivers if w.applies(reason.policy_id, agent_id, run_id, at)
        ]
        if not match:
            return None
        used.extend(m for m in match if m not in used)
    return tuple(used)


def status_at(waiver: Waiver, now: datetime) -> Status:
    """The waiver's status as of ``now`` (open but past its expiry reads as expired)."""
    if waiver.status == "open" and now >= waiver.expires_at:
        return "expired"
    return waiver.status


def listing(state: Exceptions, now: datetime, status: Status | None) -> dict[str, Any]:
    """The tenant's waivers (of one status), and the burndown: open waivers by expiry day."""
    items = []
    burndown: dict[str, int] = {}
    for w in state.waivers:
        current = status_at(w, now)
        if current == "open":
            day = w.expires_at.date().isoformat()
            burndown[day] = burndown.get(day, 0) + 1
        if status is None or current == status:
            items.append({**w.as_dict(), "status": current})
    return {
        "exceptions": items,
        "burndown": [{"day": d, "open": n} for d, n in sorted(burndown.items())],
    }
