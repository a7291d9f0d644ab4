"""Policy drift between a tenant's environments: what sandbox and production decide with, compared
dimension by dimension.

A **snapshot** of one environment hashes what its decisions are made with:

* ``policy_bundle_digest``: the bundle deciding there (the tenant's own, or the repository's);
* ``policy_set_hash``: the bundle digest, the tenant's settings and its open exceptions together;
* ``allowlist_hash``: the effective model and tool allowlists (settings, else the bundle's data);
* ``exceptions_hash``: the open policy exceptions (id, policy, scope, expiry);
* ``enforcement_mode_hash``: the effective enforcement of ``admission_required``.

The environments have **drifted** when their snapshots differ in any dimension. Stream
``<t>/policy/drift`` (category ``policy``) records ``policy.drift_detected`` when a comparison
finds drift not recorded yet (its ``fingerprint`` names both snapshots), ``policy.drift_resolved``
when they match again and ``policy.drift_acknowledged`` when an operator accepts the recorded
drift with a reason. Unacknowledged drift blocks promotions. Everything here is pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import PolicyDriftAcknowledged, PolicyDriftDetected, PolicyDriftResolved
from libs.contracts.policy import ENVIRONMENTS
from libs.errors import Conflict
from libs.eventbus.repository import Aggregate, fold_with_time

DRIFT_ENTITY = "drift"
DIMENSIONS = (
    "policy_bundle_digest",
    "policy_set_hash",
    "allowlist_hash",
    "exceptions_hash",
    "enforcement_mode_hash",
)
ALLOWLISTS = ("model_allowlist", "tool_allowlist")


def _hash(document: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(document)).hexdigest()


def effective_setting(
    data: Mapping[str, Any], tenant_id: str, settings: Mapping[str, Any] | None, name: str
) -> Any:
    """What ``lib/config.rego``'s ``setting(name, _)`` reads: the tenant's settings, else its
    entry in the bundle's ``data.json``, else the bundle default (``None`` when none has it)."""
    if settings is not None and settings.get(name) is not None:
        return settings[name]
    config = (data.get("missioncontrol") or {}).get("config") or {}
    tenant = (config.get("tenants") or {}).get(tenant_id) or {}
    if name in tenant:
        return tenant[name]
    return (config.get("defaults") or {}).get(name)


@dataclass(frozen=True)
class EnvironmentInputs:
    """What one environment decides with, as a replica holds it."""

    bundle_digest: str
    bundle_data: Mapping[str, Any]
    settings: Mapping[str, Any] | None
    exceptions: tuple[Mapping[str, Any], ...]
    """Each open exception as ``{exception_id, policy_id, agent_id, run_id, expires_at}``."""


def snapshot(tenant_id: str, inputs: EnvironmentInputs) -> dict[str, str]:
    """The five dimension hashes of one environment."""
    exceptions = sorted(
        ({k: e.get(k) for k in ("exception_id", "policy_id", "agent_id", "run_id", "expires_at")}
         for e in inputs.exceptions),
        key=lambda e: str(e["exception_id"]),
    )  # fmt: skip
    settings = dict(inputs.settings or {})
    return {
        "policy_bundle_digest": inputs.bundle_digest,
        "policy_set_hash": _hash(
            {
                "bundle_digest": inputs.bundle_digest,
                "settings": settings,
                "exceptions": sorted(str(e["exception_id"]) for e in exceptions),
            }
        ),
        "allowlist_hash": _hash(
            {
                name: sorted(effective_setting(inputs.bundle_data, tenant_id, settings, name) or [])
                for name in ALLOWLISTS
            }
        ),
        "exceptions_hash": _hash(exceptions),
        "enforcement_mode_hash": _hash(
            {
                "admission_required": effective_setting(
                    inputs.bundle_data, tenant_id, settings, "admission_required"
                )
                or "enforce"
            }
        ),
    }


def compare(snapshots: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The dimensions in which the environments' snapshots differ, in :data:`DIMENSIONS`
    order (empty: no drift)."""
    return [d for d in DIMENSIONS if len({snapshots[e][d] for e in ENVIRONMENTS}) > 1]


def fingerprint(snapshots: Mapping[str, Mapping[str, str]]) -> str:
    """One hash naming both environments' snapshots: the same drift has the same fingerprint."""
    return _hash({e: dict(snapshots[e]) for e in ENVIRONMENTS})


@dataclass(frozen=True)
class RecordedDrift:
    """The drift on record: when found, in which dimensions, and whether it was accepted."""

    fingerprint: str
    dimensions: tuple[str, ...]
    snapshots: Mapping[str, Mapping[str, str]]
    detected_at: datetime
    acknowledged_by: str | None = None
    acknowledged_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The API's view."""
        return {
            "fingerprint": self.fingerprint,
            "dimensions": list(self.dimensions),
            "snapshots": {e: dict(s) for e, s in self.snapshots.items()},
            "detected_at": self.detected_at.isoformat(),
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_reason": self.acknowledged_reason,
        }


@dataclass(frozen=True)
class Drift:
    """A tenant's drift record: the current drift (``None``: the environments match) and how
    many times drift was found."""

    current: RecordedDrift | None = None
    detections: int = 0
    last_checked_at: datetime | None = None


def evolve(state: Drift, event: DomainEvent, occurred_at: datetime) -> Drift:
    """``state`` after ``event``."""
    if isinstance(event, PolicyDriftDetected):
        found = RecordedDrift(
            event.fingerprint, tuple(event.dimensions), event.snapshots, occurred_at
        )
        return Drift(found, state.detections + 1, occurred_at)
    if isinstance(event, PolicyDriftResolved):
        return replace(state, current=None, last_checked_at=occurred_at)
    current = state.current
    if (
        isinstance(event, PolicyDriftAcknowledged)
        and current is not None
        and current.fingerprint == event.fingerprint
    ):
        accepted = replace(current, acknowledged_by=event.by, acknowledged_reason=event.reason)
        return replace(state, current=accepted)
    return state


DRIFT = Aggregate[Drift](
    category="policy", initial=lambda t, i: Drift(), fold=fold_with_time(evolve)
)


# --- decisions (pure) ----------------------------------------------------------------------------


def check(state: Drift, snapshots: Mapping[str, Mapping[str, str]]) -> list[DomainEvent]:
    """Compare the environments: ``policy.drift_detected`` for drift not on record (or drift
    that changed), ``policy.drift_resolved`` when drift on record is gone, else nothing."""
    dimensions = compare(snapshots)
    if not dimensions:
        if state.current is None:
            return []
        return [PolicyDriftResolved(fingerprint=state.current.fingerprint)]
    found = fingerprint(snapshots)
    if state.current is not None and state.current.fingerprint == found:
        return []
    return [
        PolicyDriftDetected(
            fingerprint=found,
            dimensions=dimensions,
            snapshots={e: dict(snapshots[e]) for e in ENVIRONMENTS},
        )
    ]


def acknowledge(
    state: Drift, *, fingerprint: str | None, by: str, reason: str
) -> list[DomainEvent]:
    """``policy.drift_acknowledged`` for the drift on record; 409 ``drift_not_found`` when
    there is none, 409 ``drift_changed`` when ``fingerprint`` names another (the operator looked
    at drift that is no longer the current one)."""
    current = state.current
    if current is None:
        raise Conflict(
            "drift_not_found: sandbox and production match; there is nothing to acknowledge"
        )
    if fingerprint is not None and fingerprint != current.fingerprint:
        raise Conflict(
            f"drift_changed: the drift on record is {current.fingerprint}, not {fingerprint}; "
            "read it again before acknowledging"
        )
    if current.acknowledged_by is not None:
        return []
    return [PolicyDriftAcknowledged(fingerprint=current.fingerprint, by=by, reason=reason)]


def blockers(state: Drift) -> list[str]:
    """Why a promotion may not go ahead because of drift (empty: it may)."""
    current = state.current
    if current is None or current.acknowledged_by is not None:
        return []
    return [
        f"policy_drift: sandbox and production differ in {', '.join(current.dimensions)}; "
        "align them or acknowledge the drift"
    ]


def align_source(
    snapshots: Mapping[str, Mapping[str, str]], tenant_bundles: Iterable[str], source: str
) -> str:
    """The digest to activate in the other environment so that it decides with ``source``'s
    bundle; 409 ``drift_align_default`` when ``source`` decides with the repository's bundle
    (there is no tenant bundle to activate)."""
    digest = snapshots[source]["policy_bundle_digest"]
    if digest not in set(tenant_bundles):
        raise Conflict(
            f"drift_align_default: {source} decides with the repository's bundle; activate a "
            f"bundle of your own in {source} first, or align from the other environment"
        )
    return digest
