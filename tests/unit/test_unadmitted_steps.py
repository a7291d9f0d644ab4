"""No bypass: a step recorded without an allowed admission, twice, or out of order is kept, marked
and judged a violation of ``admission_required`` (pure domain: the run fold, the workflow
engine's decide, admission's judgement and the incident's and workflow's reading of it)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for, utcnow
from libs.contracts.events import (
    AdmissionDecided,
    Irregularity,
    PolicyViolationDetected,
    RunStarted,
    StepRecorded,
)
from libs.contracts.registry import upcast
from libs.domain.run import RunState, empty_run, fold, irregularities
from libs.errors import PermanentError
from libs.pricing import builtin_price_table
from services.audit_replay.domain import step_row, step_view
from services.incident.domain import Incident, OpenIncident
from services.incident.domain import decide as decide_incident
from services.policy_admission.domain import (
    ADMISSION_REQUIRED,
    RunContext,
    admission_required_mode,
    judge,
    judgement_id,
)
from services.policy_admission.domain import fold_events as fold_context
from services.workflow_engine.domain import RecordStep, RecordSteps, decide

pytestmark = pytest.mark.unit

RUN = "r-1"
AGENT = "agent-7"


def _decision(index: int, outcome: str = "allow") -> AdmissionDecided:
    return AdmissionDecided(
        decision_id=f"d-{index}-{outcome}",
        run_id=RUN,
        agent_id=AGENT,
        step_index=index,
        outcome=outcome,  # type: ignore[arg-type]
        bundle_digest="sha256:x",
    )


def _step(index: int, marks: list[Irregularity] | None = None) -> StepRecorded:
    return StepRecorded(
        run_id=RUN, agent_id=AGENT, step_index=index, irregularities=list(marks or [])
    )


def _running(*events: Any) -> RunState:
    return fold(empty_run("acme", RUN), [RunStarted(run_id=RUN, agent_id=AGENT), *events])


def _record(state: RunState, *indexes: int) -> list[list[str]]:
    cmd = RecordSteps(run_id=RUN, steps=tuple(RecordStep(RUN, i) for i in indexes))
    out = []
    for event in decide(state, cmd):
        assert isinstance(event, StepRecorded)
        out.append(list(event.irregularities))
    return out


# --- marking (workflow engine) -------------------------------------------------------------------


def test_an_admitted_step_is_recorded_unmarked() -> None:
    assert _record(_running(_decision(1)), 1) == [[]]


def test_a_warned_admission_is_an_allowed_one() -> None:
    assert _record(_running(_decision(1, "warn")), 1) == [[]]


def test_a_step_never_admitted_is_kept_and_marked_unadmitted() -> None:
    assert _record(_running(), 1) == [["unadmitted"]]


def test_a_denied_step_that_ran_anyway_is_unadmitted() -> None:
    assert _record(_running(_decision(1, "deny")), 1) == [["unadmitted"]]


def test_a_later_deny_of_the_same_index_withdraws_its_admission() -> None:
    assert _record(_running(_decision(1), _decision(1, "deny")), 1) == [["unadmitted"]]


def test_one_admission_covers_one_record_a_second_is_duplicate_and_unadmitted() -> None:
    state = _running(_decision(1), _step(1))
    assert _record(state, 1) == [["unadmitted", "duplicate"]]


def test_a_duplicate_readmitted_is_still_a_duplicate() -> None:
    state = _running(_decision(1), _step(1), _decision(1))
    assert _record(state, 1) == [["duplicate"]]


def test_an_index_below_the_last_admitted_after_it_is_out_of_order() -> None:
    # Step 5 ran; then the agent asks for step 3 and records it: admitted, but out of order.
    state = _running(_decision(5), _step(5), _decision(3))
    assert _record(state, 3) == [["out_of_order"]]


def test_an_index_below_the_last_never_admitted_is_unadmitted_and_out_of_order() -> None:
    state = _running(_decision(5), _step(5))
    assert _record(state, 3) == [["unadmitted", "out_of_order"]]


def test_steps_admitted_together_may_finish_in_any_order() -> None:
    # Steps 2 and 3 admitted in parallel; 3 finishes first: 2 is not out of order.
    state = _running(_decision(1), _step(1), _decision(2), _decision(3))
    assert _record(state, 3, 2) == [[], []]


def test_within_one_batch_an_admission_is_used_once() -> None:
    assert _record(_running(_decision(4)), 4, 4) == [[], ["unadmitted", "duplicate"]]


def test_admissions_do_not_move_the_runs_version() -> None:
    assert _running(_decision(1), _decision(2)).version == 1


def test_irregularities_is_the_one_definition() -> None:
    assert irregularities(frozenset({1}), 1, {}, 1) == ["unadmitted", "duplicate"]
    assert irregularities(frozenset(), 0, {1: True}, 1) == []
    assert irregularities(frozenset({1, 2}), 2, {1: False}, 1) == ["duplicate", "out_of_order"]


# --- events: versions ----------------------------------------------------------------------------


def test_a_stored_v1_step_reads_as_unmarked() -> None:
    payload = {"run_id": RUN, "agent_id": AGENT, "step_index": 1}
    assert upcast("run.step_recorded", 1, payload)["irregularities"] == []


def test_a_stored_v1_violation_reads_as_enforced() -> None:
    assert upcast("policy.violation_detected", 1, {})["enforcement"] == "enforce"


# --- judging (policy-admission) ------------------------------------------------------------------


def _judge(context: RunContext, step: StepRecorded, enforcement: str = "enforce") -> list[Any]:
    return judge(
        context,
        step,
        step_event_id=uuid.UUID(int=7),
        enforcement=enforcement,  # type: ignore[arg-type]
        bundle_digest="sha256:x",
        trace_id=None,
    )


def test_an_unmarked_step_is_not_judged() -> None:
    assert _judge(RunContext("acme", RUN), _step(1)) == []


@pytest.mark.parametrize("enforcement", ["enforce", "warn"])
def test_a_marked_step_is_a_violation_of_admission_required(enforcement: str) -> None:
    (event,) = _judge(RunContext("acme", RUN), _step(3, ["unadmitted"]), enforcement)
    assert isinstance(event, PolicyViolationDetected)
    assert event.policy_id == ADMISSION_REQUIRED
    assert event.step_index == 3
    assert event.enforcement == enforcement
    assert event.violation_id == judgement_id(uuid.UUID(int=7))
    assert "without an allowed admission" in event.message


def test_a_step_is_judged_once() -> None:
    (event,) = _judge(RunContext("acme", RUN), _step(3, ["duplicate"]))
    context = fold_context(RunContext("acme", RUN), [(event, utcnow())], prices=_prices())
    assert _judge(context, _step(3, ["duplicate"])) == []


def test_a_run_that_already_violated_gets_no_second_violation() -> None:
    (first,) = _judge(RunContext("acme", RUN), _step(2, ["unadmitted"]))
    context = fold_context(RunContext("acme", RUN), [(first, utcnow())], prices=_prices())
    later = judge(
        context,
        _step(3, ["unadmitted"]),
        step_event_id=uuid.UUID(int=8),
        enforcement="enforce",
        bundle_digest="sha256:x",
        trace_id=None,
    )
    assert later == []


def test_an_enforced_judgement_stops_admitting_a_warned_one_does_not() -> None:
    enforced, warned = (
        _judge(RunContext("acme", RUN), _step(2, ["unadmitted"]), mode)[0]
        for mode in ("enforce", "warn")
    )
    ctx = RunContext("acme", RUN)
    assert fold_context(ctx, [(enforced, utcnow())], prices=_prices()).violated == (
        ADMISSION_REQUIRED,
    )
    assert fold_context(ctx, [(warned, utcnow())], prices=_prices()).violated == ()


def _prices() -> Any:
    return builtin_price_table()


def _data(defaults: dict[str, Any], tenants: dict[str, Any]) -> dict[str, Any]:
    return {"missioncontrol": {"config": {"defaults": defaults, "tenants": tenants}}}


def test_the_mode_is_enforce_by_default_and_set_per_tenant() -> None:
    assert admission_required_mode({}, "acme") == "enforce"
    data = _data({"admission_required": "enforce"}, {"lax": {"admission_required": "warn"}})
    assert admission_required_mode(data, "acme") == "enforce"
    assert admission_required_mode(data, "lax") == "warn"
    data = _data({"admission_required": "warn"}, {"strict": {"admission_required": "enforce"}})
    assert admission_required_mode(data, "strict") == "enforce"
    assert admission_required_mode(data, "other") == "warn"


def test_a_misspelt_mode_is_refused_not_guessed() -> None:
    with pytest.raises(PermanentError, match="admission_required must be one of"):
        admission_required_mode(_data({"admission_required": "off"}, {}), "acme")


# --- what follows a judgement (incident) ---------------------------------------------------------


@pytest.mark.parametrize(("enforcement", "opened"), [("enforce", 1), ("warn", 0)])
def test_only_an_enforced_violation_opens_an_incident(enforcement: str, opened: int) -> None:
    (violation,) = _judge(RunContext("acme", RUN), _step(3, ["unadmitted"]), enforcement)
    cmd = OpenIncident(violation)
    events = decide_incident(Incident("acme", cmd.incident_id), cmd)
    assert len(events) == opened


# --- what the trace shows ------------------------------------------------------------------------


def test_the_trace_shows_a_steps_marks() -> None:
    step = _step(2, ["unadmitted", "out_of_order"])
    sid = stream_id_for("acme", "run", RUN)
    env = envelope_for(step, tenant_id="acme", stream_id=sid, correlation_id="c", actor="a")
    assert step_view(step_row(env, step))["irregularities"] == ["unadmitted", "out_of_order"]
    assert step_view(step_row(env, _step(3)))["irregularities"] == []
