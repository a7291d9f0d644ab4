"""Policy exceptions: granting, revoking and expiring (pure), and how a waiver matches a deny."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.contracts.events import (
    PolicyExceptionExpired,
    PolicyExceptionGranted,
    PolicyExceptionRevoked,
    Reason,
)
from libs.errors import Conflict, InvalidInput, NotFound
from services.policy_admission.domain import interpret, waive
from services.policy_admission.exceptions import (
    Exceptions,
    evolve,
    expire,
    grant,
    listing,
    revoke,
    waiving,
)

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
EXPIRY = NOW + timedelta(hours=1)


def _grant(state: Exceptions, exception_id: str = "ex-1", **kw: object) -> Exceptions:
    args: dict[str, object] = {
        "exception_id": exception_id,
        "policy_id": "tool_allowlist",
        "agent_id": "agent-a",
        "run_id": None,
        "reason": "migration week",
        "granted_by": "user:alice",
        "expires_at": EXPIRY,
        "now": NOW,
        **kw,
    }
    for event in grant(state, **args):  # type: ignore[arg-type]
        state = evolve(state, event, NOW)
    return state


def _deny(policy_id: str) -> Reason:
    return Reason(policy_id=policy_id, severity="high", message=f"{policy_id} says no")


def test_a_grant_records_who_why_and_the_expiry_to_the_second() -> None:
    events = grant(
        Exceptions(),
        exception_id="ex-1",
        policy_id="tool_allowlist",
        agent_id="agent-a",
        run_id=None,
        reason="migration week",
        granted_by="user:alice",
        expires_at=EXPIRY + timedelta(microseconds=999),
        now=NOW,
    )
    assert events == [
        PolicyExceptionGranted(
            exception_id="ex-1",
            policy_id="tool_allowlist",
            agent_id="agent-a",
            reason="migration week",
            granted_by="user:alice",
            expires_at=EXPIRY,
        )
    ]
    # The same grant again records nothing.
    assert grant(_grant(Exceptions()), **{**_args(), "now": NOW}) == []


def test_a_retried_grant_is_answered_even_after_expiry_and_other_terms_are_a_conflict() -> None:
    held = _grant(Exceptions())
    # Retried after its expiry passed: still the same grant, not a refusal for a past expiry.
    assert grant(held, **{**_args(), "now": EXPIRY + timedelta(seconds=5)}) == []  # type: ignore[arg-type]
    for change in ({"reason": "another"}, {"expires_at": EXPIRY + timedelta(seconds=1)}):
        with pytest.raises(Conflict, match="exception_id_taken"):
            grant(held, **{**_args(), "now": NOW, **change})  # type: ignore[arg-type]


def _args() -> dict[str, object]:
    return {
        "exception_id": "ex-1",
        "policy_id": "tool_allowlist",
        "agent_id": "agent-a",
        "run_id": None,
        "reason": "migration week",
        "granted_by": "user:alice",
        "expires_at": EXPIRY,
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"expires_at": NOW}, "exception_expiry_past"),
        ({"expires_at": NOW - timedelta(days=1)}, "exception_expiry_past"),
        ({"expires_at": NOW + timedelta(days=90, seconds=1)}, "exception_expiry_too_far"),
        ({"expires_at": datetime(2026, 12, 1, 12, 0)}, "exception_expiry_invalid"),
        ({"agent_id": None}, "exception_scope_invalid"),
        ({"run_id": "run-1"}, "exception_scope_invalid"),
        ({"policy_id": "run_state"}, "exception_policy_unwaivable"),
    ],
)
def test_a_bad_grant_is_refused_by_name(change: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        grant(Exceptions(), **{**_args(), **change, "now": NOW})  # type: ignore[arg-type]


def test_ninety_days_ahead_exactly_is_allowed() -> None:
    assert grant(Exceptions(), **{**_args(), "expires_at": NOW + timedelta(days=90), "now": NOW})  # type: ignore[arg-type]


def test_revoke_closes_the_waiver_once_and_an_unknown_id_is_404() -> None:
    state = _grant(Exceptions())
    events = revoke(state, "ex-1", "user:bob", "done early")
    assert events == [
        PolicyExceptionRevoked(exception_id="ex-1", revoked_by="user:bob", reason="done early")
    ]
    state = evolve(state, events[0], NOW)
    assert state.open() == ()
    assert revoke(state, "ex-1", "user:bob", None) == []
    with pytest.raises(NotFound, match="exception_not_found"):
        revoke(state, "nope", "user:bob", None)


def test_expire_closes_exactly_those_at_or_past_their_expiry() -> None:
    state = _grant(_grant(Exceptions()), "ex-2", expires_at=EXPIRY + timedelta(seconds=1))
    assert expire(state, EXPIRY - timedelta(seconds=1)) == []
    events = expire(state, EXPIRY)
    assert events == [PolicyExceptionExpired(exception_id="ex-1", expires_at=EXPIRY)]
    state = evolve(state, events[0], EXPIRY)
    assert [w.exception_id for w in state.open()] == ["ex-2"]
    assert state.get("ex-1") is not None and state.get("ex-1").status == "expired"  # type: ignore[union-attr]


def test_a_waiver_applies_before_its_expiry_and_never_at_it() -> None:
    waivers = _grant(Exceptions()).open()
    denies = [_deny("tool_allowlist")]
    one_before = EXPIRY - timedelta(microseconds=1)
    assert waiving(waivers, denies, agent_id="agent-a", run_id="r", at=one_before) == ("ex-1",)
    assert waiving(waivers, denies, agent_id="agent-a", run_id="r", at=EXPIRY) is None
    assert (
        waiving(waivers, denies, agent_id="agent-a", run_id="r", at=EXPIRY + timedelta(1)) is None
    )


def test_a_waiver_matches_only_its_policy_and_its_agent_or_run() -> None:
    by_agent = _grant(Exceptions())
    by_run = _grant(by_agent, "ex-run", agent_id=None, run_id="run-7", policy_id="max_tokens")
    waivers = by_run.open()
    at = NOW
    tools, tokens = _deny("tool_allowlist"), _deny("max_tokens")
    assert waiving(waivers, [tools], agent_id="agent-b", run_id="run-1", at=at) is None
    assert (
        waiving(waivers, [_deny("model_allowlist")], agent_id="agent-a", run_id="r", at=at) is None
    )
    assert waiving(waivers, [tokens], agent_id="agent-a", run_id="run-1", at=at) is None
    assert waiving(waivers, [tokens], agent_id="x", run_id="run-7", at=at) == ("ex-run",)
    # Every deny must be waived; then every waiver used is named.
    assert waiving(waivers, [tools, tokens], agent_id="agent-a", run_id="run-1", at=at) is None
    assert waiving(waivers, [tools, tokens], agent_id="agent-a", run_id="run-7", at=at) == (
        "ex-1",
        "ex-run",
    )
    # A revoked waiver covers nothing.
    revoked = evolve(by_run, revoke(by_run, "ex-1", "user:bob", None)[0], NOW)
    assert waiving(revoked.open(), [tools], agent_id="agent-a", run_id="r", at=at) is None


def test_a_fully_waived_deny_becomes_a_warn_naming_the_exceptions() -> None:
    decision = interpret({"deny": [_deny("tool_allowlist").model_dump()]})
    waived = waive(decision, ("ex-1",))
    assert waived.outcome == "warn"
    assert waived.exceptions == ("ex-1",)
    assert waived.violated is None  # no violation is recorded
    assert [r.policy_id for r in waived.reasons] == ["tool_allowlist"]
    assert waive(decision, None) == decision


def test_the_listing_filters_by_status_and_counts_open_ones_by_expiry_day() -> None:
    state = _grant(Exceptions())
    state = _grant(state, "ex-2", expires_at=NOW + timedelta(days=2))
    state = _grant(state, "ex-3", expires_at=NOW + timedelta(days=2, hours=1))
    state = evolve(state, revoke(state, "ex-3", "user:bob", None)[0], NOW)
    out = listing(state, NOW, None)
    assert [e["status"] for e in out["exceptions"]] == ["open", "open", "revoked"]
    assert out["burndown"] == [{"day": "2026-11-30", "open": 1}, {"day": "2026-12-02", "open": 1}]
    # Past its expiry an unswept waiver already reads as expired.
    later = listing(state, EXPIRY, "expired")
    assert [e["exception_id"] for e in later["exceptions"]] == ["ex-1"]
    assert later["burndown"] == [{"day": "2026-12-02", "open": 1}]
    assert [e["exception_id"] for e in listing(state, NOW, "revoked")["exceptions"]] == ["ex-3"]
