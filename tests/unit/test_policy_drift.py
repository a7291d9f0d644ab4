"""Policy drift (pure): the five dimension hashes, what differs, what is recorded, and what an
acknowledgement or an alignment may do."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import PolicyDriftDetected, PolicyDriftResolved
from libs.errors import Conflict
from services.policy_admission.drift import (
    DIMENSIONS,
    Drift,
    EnvironmentInputs,
    acknowledge,
    align_source,
    blockers,
    check,
    effective_setting,
    evolve,
    fingerprint,
    snapshot,
)

AT = datetime(2026, 11, 30, 12, tzinfo=UTC)
DATA: dict[str, Any] = {
    "missioncontrol": {
        "config": {
            "defaults": {"model_allowlist": [], "admission_required": "enforce"},
            "tenants": {"acme": {"model_allowlist": ["gpt-4o"]}},
        }
    }
}
WAIVER = {
    "exception_id": "ex-1",
    "policy_id": "tool_allowlist",
    "agent_id": "a",
    "run_id": None,
    "expires_at": "2026-12-01T00:00:00+00:00",
    "reason": "not part of the hash",
}


def _inputs(
    digest: str = "sha256:" + "a" * 64, data: dict[str, Any] = DATA, **kw: Any
) -> EnvironmentInputs:
    return EnvironmentInputs(
        bundle_digest=digest,
        bundle_data=data,
        settings=kw.get("settings"),
        exceptions=kw.get("exceptions", ()),
    )


def _apply(state: Drift, events: list[DomainEvent]) -> Drift:
    for event in events:
        state = evolve(state, event, AT)
    return state


def test_settings_win_over_the_tenants_entry_which_wins_over_the_defaults() -> None:
    assert effective_setting(DATA, "acme", None, "model_allowlist") == ["gpt-4o"]
    assert effective_setting(DATA, "other", None, "model_allowlist") == []
    assert effective_setting(DATA, "acme", {"model_allowlist": ["x"]}, "model_allowlist") == ["x"]
    assert effective_setting(DATA, "acme", {"model_allowlist": None}, "model_allowlist") == [
        "gpt-4o"
    ]
    assert effective_setting({}, "acme", None, "tool_allowlist") is None


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"digest": "sha256:" + "b" * 64}, {"policy_bundle_digest", "policy_set_hash"}),
        ({"settings": {"model_allowlist": ["claude"]}}, {"policy_set_hash", "allowlist_hash"}),
        (
            {"settings": {"admission_required": "warn"}},
            {"policy_set_hash", "enforcement_mode_hash"},
        ),
        ({"exceptions": (WAIVER,)}, {"policy_set_hash", "exceptions_hash"}),
        ({"settings": {"model_allowlist": ["gpt-4o"]}}, {"policy_set_hash"}),
    ],
)
def test_each_dimension_moves_with_what_it_names_only(
    change: dict[str, Any], differs: set[str]
) -> None:
    base = snapshot("acme", _inputs())
    changed = snapshot("acme", _inputs(**change))
    assert set(base) == set(DIMENSIONS)
    assert {d for d in DIMENSIONS if base[d] != changed[d]} == differs


def test_the_order_of_an_allowlist_or_of_exceptions_is_not_allowlist_or_exception_drift() -> None:
    # (policy_set_hash names the settings document as stored, so it may differ.)
    other = {**WAIVER, "exception_id": "ex-2"}
    one = snapshot(
        "acme", _inputs(settings={"model_allowlist": ["a", "b"]}, exceptions=(WAIVER, other))
    )
    two = snapshot(
        "acme", _inputs(settings={"model_allowlist": ["b", "a"]}, exceptions=(other, WAIVER))
    )
    assert one["allowlist_hash"] == two["allowlist_hash"]
    assert one["exceptions_hash"] == two["exceptions_hash"]


def _pair(sandbox_digest: str) -> dict[str, dict[str, str]]:
    return {
        "sandbox": snapshot("acme", _inputs(sandbox_digest)),
        "production": snapshot("acme", _inputs()),
    }


def test_drift_is_recorded_once_per_fingerprint_and_resolved_when_it_ends() -> None:
    drifted = _pair("sha256:" + "b" * 64)
    events = check(Drift(), drifted)
    assert events == [
        PolicyDriftDetected(
            fingerprint=fingerprint(drifted),
            dimensions=["policy_bundle_digest", "policy_set_hash"],
            snapshots=drifted,
        )
    ]
    state = _apply(Drift(), events)
    assert check(state, drifted) == []  # the same drift found again
    assert blockers(state) == [
        "policy_drift: sandbox and production differ in policy_bundle_digest, policy_set_hash; "
        "align them or acknowledge the drift"
    ]
    other = _pair("sha256:" + "c" * 64)
    assert len(check(state, other)) == 1  # drift that changed is recorded again
    same = _pair("sha256:" + "a" * 64)
    assert check(state, same) == [PolicyDriftResolved(fingerprint=fingerprint(drifted))]
    assert check(Drift(), same) == []
    assert blockers(_apply(state, check(state, same))) == []


def test_an_acknowledgement_accepts_the_drift_seen_until_the_drift_changes() -> None:
    drifted = _pair("sha256:" + "b" * 64)
    state = _apply(Drift(), check(Drift(), drifted))
    with pytest.raises(Conflict, match="drift_changed"):
        acknowledge(state, fingerprint="sha256:" + "0" * 64, by="user:ann", reason="r")
    state = _apply(
        state, acknowledge(state, fingerprint=fingerprint(drifted), by="user:ann", reason="r")
    )
    assert blockers(state) == []
    assert state.current is not None and state.current.acknowledged_by == "user:ann"
    assert acknowledge(state, fingerprint=None, by="user:bob", reason="again") == []
    # New drift blocks again, whatever was accepted before.
    state = _apply(state, check(state, _pair("sha256:" + "c" * 64)))
    assert blockers(state) != []
    with pytest.raises(Conflict, match="drift_not_found"):
        acknowledge(Drift(), fingerprint=None, by="user:ann", reason="r")


def test_alignment_copies_a_tenant_bundle_never_the_repository_default() -> None:
    drifted = _pair("sha256:" + "b" * 64)
    assert align_source(drifted, ["sha256:" + "b" * 64], "sandbox") == "sha256:" + "b" * 64
    with pytest.raises(Conflict, match="drift_align_default"):
        align_source(drifted, ["sha256:" + "b" * 64], "production")
