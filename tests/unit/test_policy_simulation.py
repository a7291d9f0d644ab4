"""Counterfactual simulation, pure: rebuilding inputs, flips, stopped runs, prevented cost, and
policy exceptions applied as of each decision's second."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from libs.contracts.events import Outcome, Reason
from libs.pricing import builtin_price_table
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR, PolicyBundle, bundle_files
from services.policy_admission.domain import (
    AdmitRequest,
    RunContext,
    StepEstimate,
    build_input,
    decision_context,
)
from services.policy_admission.exceptions import Waiver
from services.policy_admission.simulation import (
    RecordedDecision,
    Tally,
    rebuild_input,
    report_csv,
    simulated_decision,
    waivers_at,
)
from services.policy_admission.simulation_eval import BatchEvaluator

AT = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
EXPIRY = AT + timedelta(hours=1)


def _reason(policy_id: str, severity: str = "high") -> dict[str, Any]:
    return {"policy_id": policy_id, "severity": severity, "message": f"{policy_id} says so"}


def _record(
    run_id: str = "run-1",
    step: int = 1,
    outcome: Outcome = "allow",
    reasons: tuple[str, ...] = (),
    at: datetime = AT,
    agent_id: str = "agent-a",
) -> RecordedDecision:
    return RecordedDecision(
        decision_id=f"{run_id}-{step}-{outcome}",
        run_id=run_id,
        step_index=step,
        outcome=outcome,
        reasons=tuple(Reason.model_validate(_reason(p)) for p in reasons),
        context={"run_id": run_id, "agent_id": agent_id},
        occurred_at=at,
    )


def _raw(deny: tuple[str, ...] = (), warn: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"deny": [_reason(p) for p in deny], "warn": [_reason(p) for p in warn]}


def _waiver(**kw: Any) -> Waiver:
    args: dict[str, Any] = {
        "exception_id": "ex-1",
        "policy_id": "token_limit",
        "agent_id": "agent-a",
        "run_id": None,
        "reason": "load test",
        "granted_by": "user:alice",
        "granted_at": AT - timedelta(hours=1),
        "expires_at": EXPIRY,
        **kw,
    }
    return Waiver(**args)


# --- rebuilding the input ------------------------------------------------------------------------


def test_the_input_rebuilt_from_a_recorded_context_is_the_input_admission_built() -> None:
    context = RunContext(
        tenant_id="acme",
        run_id="run-7",
        cost_usd=Decimal("0.125"),
        unpriced_steps=1,
        violated=("tool_allowlist",),
        reservations=((4, 900, Decimal("0.01")),),
    )
    for model, environment in (("gpt-4o", "sandbox"), ("no-such-model", None)):
        request = AdmitRequest(
            run_id="run-7",
            step_index=5,
            kind="tool_call",
            model=model,
            tool="search",
            estimate=StepEstimate(input_tokens=300, max_output_tokens=700),
            environment=environment,
        )
        built = build_input(context, request, prices=builtin_price_table(), at=AT)
        built["settings"] = {"max_tokens_per_run": 5000}
        # What admission adds for a registered agent and the policy set it decided with.
        built["policy_set_hash"] = "sha256:" + "1" * 64
        built["agent"] = {"registered": True, "version": 2, "state": "governed"}
        recorded = json.loads(json.dumps(decision_context(built)))  # as stored and read back
        rebuilt = rebuild_input(
            "acme", 5, recorded, environment="production", settings=built["settings"]
        )
        assert rebuilt == built


def test_a_context_recorded_before_it_named_its_environment_takes_the_one_given() -> None:
    rebuilt = rebuild_input("acme", 2, {"run_id": "r", "step": {}}, environment="sandbox")
    assert rebuilt["environment"] == "sandbox"
    assert "settings" not in rebuilt
    assert rebuilt["run"] == {"run_id": "r"}


# --- flips and stops -----------------------------------------------------------------------------


def test_flips_are_counted_under_the_policy_that_causes_them() -> None:
    tally = Tally()
    tally.add(_record(step=1), simulated_decision(_raw(deny=("token_limit",)), _record(), ()))
    denied = _record(run_id="run-2", outcome="deny", reasons=("cost_cap",))
    tally.add(denied, simulated_decision(_raw(), denied, ()))
    warned = _record(run_id="run-3", outcome="warn", reasons=("model_allowlist",))
    tally.add(warned, simulated_decision(_raw(warn=("tool_allowlist",)), warned, ()))
    same = _record(run_id="run-4", outcome="deny", reasons=("cost_cap",))
    tally.add(same, simulated_decision(_raw(deny=("cost_cap",)), same, ()))
    report = tally.report({})
    policies = {p["policy_id"]: p for p in report["policies"]}
    assert report["decisions"] == 4
    assert report["flipped"] == 3
    assert policies["token_limit"]["flips"]["allow_to_deny"] == 1
    assert policies["cost_cap"]["flips"]["deny_to_allow"] == 1
    assert policies["tool_allowlist"]["flips"]["warn_changed"] == 1
    assert policies["model_allowlist"]["flips"]["warn_changed"] == 1
    assert [f["kind"] for f in report["flipped_decisions"]] == [
        "allow_to_deny",
        "deny_to_allow",
        "warn_changed",
    ]


def test_a_run_stops_at_its_first_step_flipped_to_deny_and_prevents_the_cost_from_it_on() -> None:
    tally = Tally()
    for step in (4, 2, 3):  # pages need not come in step order
        record = _record(step=step)
        tally.add(record, simulated_decision(_raw(deny=("token_limit",)), record, ()))
    record = _record(step=1)
    tally.add(record, simulated_decision(_raw(), record, ()))
    costs = {"run-1": {1: Decimal("1.5"), 2: Decimal("0.25"), 3: None, 4: Decimal("0.125")}}
    report = tally.report(costs)
    assert report["runs_stopped"] == 1
    [stop] = report["stopped_runs"]
    assert (stop["step_index"], stop["policy_id"]) == (2, "token_limit")
    assert stop["prevented_cost_usd"] == "0.375000"
    assert stop["unpriced_steps"] == 1
    [policy] = report["policies"]
    assert policy["runs_stopped"] == 1
    assert policy["prevented_cost_usd"] == report["prevented_cost_usd"] == "0.375000"


def test_a_step_already_denied_or_denied_for_run_state_stops_nothing_new() -> None:
    tally = Tally()
    denied = _record(outcome="deny", reasons=("token_limit",))
    tally.add(denied, simulated_decision(_raw(deny=("token_limit",)), denied, ()))
    stopped = _record(run_id="run-2")
    tally.add(stopped, simulated_decision(_raw(deny=("run_state",)), stopped, ()))
    report = tally.report({"run-1": {1: Decimal(1)}, "run-2": {1: Decimal(1)}})
    assert report["runs_stopped"] == 0
    assert report["prevented_cost_usd"] == "0.000000"
    assert report["flipped"] == 1  # run-2's allow to deny is a flip, with no stop of its own


def test_the_csv_has_a_row_per_policy_and_a_total() -> None:
    tally = Tally()
    record = _record()
    tally.add(record, simulated_decision(_raw(deny=("token_limit",)), record, ()))
    lines = report_csv(tally.report({"run-1": {1: Decimal("2")}})).splitlines()
    assert lines[0].startswith("policy_id,flipped,allow_to_deny,")
    assert lines[1].startswith("token_limit,1,1,")
    assert lines[1].endswith(",1,2.000000,0")
    assert lines[2].startswith("*,1,")


def test_a_policy_id_is_never_read_as_a_spreadsheet_formula() -> None:
    tally = Tally()
    record = _record()
    tally.add(record, simulated_decision(_raw(deny=("=cmd|calc",)), record, ()))
    assert "\n'=cmd|calc," in report_csv(tally.report({}))


# --- exceptions, as of each decision's second ----------------------------------------------------


def test_an_exception_waives_a_deny_until_the_second_of_its_expiry_and_not_at_it() -> None:
    waivers = (_waiver(),)
    before = _record(at=EXPIRY - timedelta(microseconds=1))
    at = _record(at=EXPIRY)
    waived = simulated_decision(_raw(deny=("token_limit",)), before, waivers)
    assert (waived.outcome, waived.exceptions) == ("warn", ("ex-1",))
    assert simulated_decision(_raw(deny=("token_limit",)), at, waivers).outcome == "deny"
    tally = Tally()
    tally.add(before, waived)
    tally.add(at, simulated_decision(_raw(deny=("token_limit",)), at, waivers))
    report = tally.report({})
    assert report["waived"] == 1
    assert [f["kind"] for f in report["flipped_decisions"]] == ["allow_to_warn", "allow_to_deny"]
    assert report["stopped_runs"][0]["decision_id"] == at.decision_id


def test_an_exception_applies_only_between_its_grant_and_its_revocation() -> None:
    granted = AT - timedelta(minutes=10)
    revoked = AT + timedelta(minutes=10)
    waivers = (
        _waiver(granted_at=granted, status="revoked", closed_at=revoked, closed_by="user:bob"),
    )
    deny = _raw(deny=("token_limit",))
    outcomes = [
        simulated_decision(deny, _record(at=t), waivers).outcome
        for t in (
            granted - timedelta(microseconds=1),
            granted,
            revoked - timedelta(microseconds=1),
            revoked,
        )
    ]
    assert outcomes == ["deny", "warn", "warn", "deny"]


def test_an_exception_swept_as_expired_still_applied_before_its_expiry() -> None:
    waivers = (_waiver(status="expired", closed_at=EXPIRY, closed_by="expiry"),)
    assert [w.status for w in waivers_at(waivers, AT)] == ["open"]
    assert simulated_decision(_raw(deny=("token_limit",)), _record(), waivers).outcome == "warn"


def test_an_exception_for_another_agent_or_policy_or_a_partial_cover_waives_nothing() -> None:
    waivers = (_waiver(),)
    other_agent = _record(agent_id="agent-b")
    assert simulated_decision(_raw(deny=("token_limit",)), other_agent, waivers).outcome == "deny"
    both = _raw(deny=("token_limit", "cost_cap"))
    assert simulated_decision(both, _record(), waivers).outcome == "deny"
    by_run = (_waiver(agent_id=None, run_id="run-1", policy_id="cost_cap"), *waivers)
    assert simulated_decision(both, _record(), by_run).outcome == "warn"


# --- evaluating the candidate --------------------------------------------------------------------


def test_the_evaluator_answers_as_the_bundle_does_and_evaluates_each_distinct_input_once() -> None:
    files = [(n, s) for n, s in bundle_files(DEFAULT_BUNDLE_DIR) if not n.endswith("_test.rego")]
    modules = [(n, s) for n, s in files if n.endswith(".rego")]
    modules.append(("data.json", next(s for n, s in files if n == "data.json")))
    bundle = PolicyBundle.load(DEFAULT_BUNDLE_DIR)
    context = RunContext(tenant_id="acme", run_id="run-1")
    inputs = []
    for tokens in (100, 9500, 100):
        request = AdmitRequest(
            run_id="run-1",
            step_index=1,
            model="gpt-4o",
            estimate=StepEstimate(input_tokens=tokens, max_output_tokens=1000),
        )
        inputs.append(build_input(context, request, prices=builtin_price_table(), at=AT))
    inputs[0]["run"]["status"] = inputs[1]["run"]["status"] = "running"
    inputs[2]["run"]["status"] = "running"

    async def run() -> tuple[list[dict[str, Any] | None], int, int]:
        with BatchEvaluator("sha256:test", modules, workers=1) as evaluator:
            answers = await evaluator.evaluate(inputs)
            again = await evaluator.evaluate(inputs[:1])
            return [*answers, *again], evaluator.evaluated, evaluator.reused

    answers, evaluated, reused = asyncio.run(run())
    assert answers == [bundle.evaluate(doc) for doc in (*inputs, inputs[0])]
    assert answers[0] is not None and answers[1] is not None
    assert not answers[0]["deny"] and answers[1]["deny"]
    assert (evaluated, reused) == (2, 2)
