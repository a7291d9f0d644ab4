"""Admission's pure core: folding the run, building the Rego input, reading the decision."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts import envelope_for
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AdmissionDecided,
    ModelPrice,
    PolicyViolationDetected,
    RunCompleted,
    RunStarted,
    RunStartedV1,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.errors import InvalidInput, PermanentError
from libs.pricing import builtin_price_table, price_step, with_overrides
from services.policy_admission.domain import (
    AdmitRequest,
    Decision,
    RunContext,
    build_input,
    decide,
    evolve,
    fold,
    interpret,
    parse_request,
)

pytestmark = pytest.mark.unit

AT = datetime(2026, 1, 1, tzinfo=UTC)
PRICES = builtin_price_table()


def _ctx() -> RunContext:
    return RunContext(tenant_id="acme", run_id="r1")


def _step(i: int, model: str | None = "gpt-4o", tin: int = 100, tout: int = 50) -> StepRecorded:
    return StepRecorded(
        run_id="r1", agent_id="a1", step_index=i, model=model, input_tokens=tin, output_tokens=tout
    )


def _apply(state: RunContext, *events: DomainEvent) -> RunContext:
    for e in events:
        state = evolve(state, e, occurred_at=AT, prices=PRICES)
    return state


def _req(**kw: Any) -> AdmitRequest:
    body: dict[str, Any] = {
        "run_id": "r1",
        "step_index": 3,
        "model": "gpt-4o",
        "estimate": {"input_tokens": 1000, "max_output_tokens": 500},
    }
    body.update(kw)
    return parse_request(body)


def _reason(policy: str, severity: str = "high", message: str = "no") -> dict[str, Any]:
    return {"policy_id": policy, "severity": severity, "message": message, "runbook_url": None}


# --- fold ----------------------------------------------------------------------------------------


def test_fold_counts_steps_tokens_and_cost() -> None:
    state = _apply(
        _ctx(), RunStarted(run_id="r1", agent_id="a1"), _step(1), _step(2, tin=10, tout=5)
    )
    assert state.status == "running"
    assert state.agent_id == "a1"
    assert state.steps_recorded == 2
    assert state.last_step_index == 2
    assert state.tokens_used == 165
    expected = price_step(PRICES, "gpt-4o", 100, 50, AT).total_cost_usd
    expected2 = price_step(PRICES, "gpt-4o", 10, 5, AT).total_cost_usd
    assert expected is not None and expected2 is not None
    assert state.cost_usd == expected + expected2
    assert state.cost_usd > 0
    assert state.unpriced_steps == 0


def test_unpriced_and_tool_steps_add_tokens_but_no_cost() -> None:
    state = _apply(_ctx(), _step(1, model="mystery-9"), _step(2, model=None))
    assert state.tokens_used == 300
    assert state.cost_usd == 0
    assert state.unpriced_steps == 1


def test_tenant_prices_are_used_for_cost() -> None:
    table = with_overrides(
        PRICES,
        [
            ModelPrice(
                model="mystery-9", input_per_token=Decimal("0.01"), output_per_token=Decimal("0.02")
            )
        ],
        1,
    )
    state = evolve(_ctx(), _step(1, model="mystery-9"), occurred_at=AT, prices=table)
    assert state.cost_usd == Decimal("2.00")
    assert state.unpriced_steps == 0


def test_terminal_events_set_the_status() -> None:
    started = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"))
    assert _apply(started, RunCompleted(run_id="r1", status="failed")).status == "failed"
    stopped = _apply(
        started,
        RunStoppedByPolicy(
            run_id="r1", step_index=2, policy_id="token_limit", decision_id="d", reason="x"
        ),
    )
    assert stopped.status == "stopped_by_policy"
    assert stopped.violated == ("token_limit",)


def test_own_violations_are_remembered_once() -> None:
    v = PolicyViolationDetected(
        violation_id="d1",
        decision_id="d1",
        run_id="r1",
        agent_id="a1",
        step_index=2,
        policy_id="tool_allowlist",
        severity="high",
        message="m",
        bundle_digest="sha256:x",
    )
    state = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"), v, v)
    assert state.violated == ("tool_allowlist",)
    assert state.status == "running"


def test_fold_decodes_envelopes_including_old_versions() -> None:
    envs = [
        envelope_for(e, tenant_id="acme", stream_id="acme/run/r1", correlation_id="c", actor="t")
        for e in (RunStartedV1(run_id="r1", agent="legacy"), _step(1))
    ]
    state = fold(_ctx(), envs, prices=PRICES)
    assert state.agent_id == "legacy"
    assert state.tokens_used == 150


# --- request and input ---------------------------------------------------------------------------


def test_request_validation_names_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"estimate\.max_output_tokens"):
        parse_request({"run_id": "r", "step_index": 1, "estimate": {"input_tokens": 1}})
    with pytest.raises(InvalidInput, match="step_index"):
        parse_request(
            {
                "run_id": "r",
                "step_index": 0,
                "estimate": {"input_tokens": 1, "max_output_tokens": 1},
            }
        )
    with pytest.raises(InvalidInput, match="models"):
        _req(models="gpt-4o")


def test_build_input_carries_run_step_and_priced_estimate() -> None:
    state = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"), _step(1))
    doc = build_input(state, _req(tool="search"), prices=PRICES, at=AT)
    assert doc["tenant_id"] == "acme"
    assert doc["run"]["tokens_used"] == 150
    assert doc["run"]["status"] == "running"
    assert doc["run"]["violated"] == []
    assert doc["step"]["index"] == 3
    assert doc["step"]["tool"] == "search"
    est = doc["step"]["estimate"]
    expected = price_step(PRICES, "gpt-4o", 1000, 500, AT).total_cost_usd
    assert est["cost_usd"] == float(expected)  # type: ignore[arg-type]
    assert est["pricing_status"] == "priced"


def test_unpriced_model_estimate_is_null_and_no_model_is_zero() -> None:
    unpriced = build_input(_ctx(), _req(model="mystery-9"), prices=PRICES, at=AT)
    assert unpriced["step"]["estimate"]["cost_usd"] is None
    tool = build_input(_ctx(), _req(model=None, tool="search"), prices=PRICES, at=AT)
    assert tool["step"]["estimate"]["cost_usd"] == 0.0


# --- interpretation ------------------------------------------------------------------------------


def test_interpret_allow_warn_deny() -> None:
    assert interpret({"deny": [], "warn": []}) == Decision("allow", ())
    warn = interpret({"deny": [], "warn": [_reason("cost_cap")]})
    assert warn.outcome == "warn"
    assert warn.violated is None
    deny = interpret({"deny": [_reason("token_limit")], "warn": [_reason("cost_cap")]})
    assert deny.outcome == "deny"
    assert [r.policy_id for r in deny.reasons] == ["token_limit", "cost_cap"]


def test_deny_reasons_order_run_state_then_severity_then_id() -> None:
    d = interpret(
        {
            "deny": [
                _reason("tool_allowlist", "high"),
                _reason("model_allowlist", "medium"),
                _reason("run_state", "high"),
                _reason("cost_cap", "critical"),
            ]
        }
    )
    assert [r.policy_id for r in d.reasons] == [
        "run_state",
        "cost_cap",
        "tool_allowlist",
        "model_allowlist",
    ]
    assert d.violated is not None and d.violated.policy_id == "run_state"


def test_malformed_decision_is_refused() -> None:
    with pytest.raises(PermanentError):
        interpret({"deny": [{"policy_id": "x"}]})
    with pytest.raises(PermanentError):
        interpret({"deny": "nope"})


# --- decide --------------------------------------------------------------------------------------


def test_decide_allow_appends_only_the_decision() -> None:
    state = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"))
    req = _req()
    doc = build_input(state, req, prices=PRICES, at=AT)
    events = decide(
        state,
        req,
        Decision("allow", ()),
        decision_id="d1",
        bundle_digest="sha256:b",
        input_doc=doc,
        trace_id=None,
    )
    assert len(events) == 1
    decided = events[0]
    assert isinstance(decided, AdmissionDecided)
    assert decided.outcome == "allow"
    assert decided.agent_id == "a1"
    assert decided.step_index == 3
    assert decided.context["tokens_used"] == 0
    assert decided.context["estimate"]["input_tokens"] == 1000


def test_decide_deny_records_the_violation_of_the_first_reason() -> None:
    state = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"))
    req = _req()
    decision = interpret({"deny": [_reason("token_limit", message="over"), _reason("cost_cap")]})
    events = decide(
        state,
        req,
        decision,
        decision_id="d9",
        bundle_digest="sha256:b",
        input_doc=build_input(state, req, prices=PRICES, at=AT),
        trace_id="ab" * 16,
    )
    assert [e.event_type for e in events] == ["admission.decided", "policy.violation_detected"]
    violation = events[1]
    assert isinstance(violation, PolicyViolationDetected)
    assert violation.violation_id == violation.decision_id == "d9"
    assert violation.policy_id == decision.reasons[0].policy_id
    assert violation.message == decision.reasons[0].message
    assert violation.bundle_digest == "sha256:b"
    assert violation.trace_id == "ab" * 16


def _decided(i: int, outcome: str, tokens: tuple[int, int], cost: float | None) -> AdmissionDecided:
    return AdmissionDecided(
        decision_id=f"d{i}",
        run_id="r1",
        agent_id="a1",
        step_index=i,
        outcome=outcome,  # type: ignore[arg-type]
        bundle_digest="sha256:x",
        context={
            "estimate": {
                "input_tokens": tokens[0],
                "max_output_tokens": tokens[1],
                "cost_usd": cost,
            }
        },
    )


def test_admitted_unrecorded_steps_hold_their_estimate_until_recorded() -> None:
    s = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"))
    s = _apply(s, _decided(1, "allow", (100, 900), 0.5), _decided(2, "warn", (50, 50), None))
    assert s.tokens_reserved == 1100
    assert s.cost_reserved_usd == Decimal("0.5")
    assert s.as_input()["tokens_reserved"] == 1100
    s = _apply(s, _step(1, tin=80, tout=20))
    assert (s.tokens_used, s.tokens_reserved) == (100, 100)  # step 2 still holds its estimate
    assert s.cost_reserved_usd == 0


def test_denied_steps_reserve_nothing_and_readmission_replaces() -> None:
    s = _apply(_ctx(), _decided(1, "deny", (100, 100), 1.0))
    assert s.tokens_reserved == 0
    s = _apply(s, _decided(2, "allow", (100, 100), 1.0), _decided(2, "allow", (10, 10), 0.1))
    assert s.tokens_reserved == 20


def test_a_decision_for_an_already_recorded_step_reserves_nothing() -> None:
    s = _apply(_ctx(), _step(1), _decided(1, "allow", (100, 100), 1.0))
    assert s.tokens_reserved == 0


def test_a_refusal_only_because_of_run_state_is_no_new_violation() -> None:
    state = _apply(_ctx(), RunStarted(run_id="r1", agent_id="a1"))
    req = _req()
    decision = interpret({"deny": [_reason("run_state"), _reason("token_limit")]})
    events = decide(
        state,
        req,
        decision,
        decision_id="d10",
        bundle_digest="sha256:b",
        input_doc=build_input(state, req, prices=PRICES, at=AT),
        trace_id=None,
    )
    assert [e.event_type for e in events] == ["admission.decided"]
