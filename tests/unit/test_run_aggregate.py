"""The run aggregate: every transition, every rejection, and folding a stream back into a state."""

from __future__ import annotations

import pytest

from libs.contracts.events import RunCompleted, RunStarted, RunStoppedByPolicy, StepRecorded
from libs.errors import Conflict, InvalidInput, NotFound
from services.workflow_engine.domain import (
    FinishRun,
    RecordStep,
    RecordSteps,
    RunState,
    StartRun,
    StopRunForViolation,
    decide,
    empty_run,
    evolve,
    fold,
)

pytestmark = pytest.mark.unit

RUN = "r-1"


def _new() -> RunState:
    return empty_run("acme", RUN)


def _running(*steps: int) -> RunState:
    state = fold(_new(), [RunStarted(run_id=RUN, agent_id="agent-7", labels={"team": "a"})])
    return fold(
        state,
        [StepRecorded(run_id=RUN, agent_id="agent-7", step_index=i, input_tokens=5) for i in steps],
    )


def _stop(step: int = 3) -> StopRunForViolation:
    return StopRunForViolation(
        run_id=RUN, step_index=step, policy_id="token_limit", decision_id="d-1", reason="too many"
    )


def _stopped(step: int = 3) -> RunState:
    return fold(_running(1, 2), decide(_running(1, 2), _stop(step)))


# --- start ---------------------------------------------------------------------------------------


def test_start_on_a_new_run_emits_run_started_and_makes_it_running() -> None:
    events = decide(_new(), StartRun(run_id=RUN, agent_id="agent-7", labels={"env": "prod"}))
    assert events == [RunStarted(run_id=RUN, agent_id="agent-7", labels={"env": "prod"})]
    state = evolve(_new(), events[0])
    assert state.status == "running"
    assert state.agent_id == "agent-7"
    assert dict(state.labels) == {"env": "prod"}
    assert state.version == 1
    assert state.exists


def test_start_on_an_existing_run_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="already exists"):
        decide(_running(), StartRun(run_id=RUN, agent_id="agent-7"))


def test_start_without_an_agent_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="agent_id"):
        decide(_new(), StartRun(run_id=RUN, agent_id="  "))


def test_a_command_for_another_run_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="r-2"):
        decide(_running(), RecordStep(run_id="r-2", step_index=1))


# --- record --------------------------------------------------------------------------------------


def test_recording_a_step_carries_the_runs_agent_and_updates_counters() -> None:
    state = _running()
    events = decide(
        state,
        RecordStep(run_id=RUN, step_index=1, model="m", input_tokens=10, output_tokens=4),
    )
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, StepRecorded)
    assert event.agent_id == "agent-7"
    assert (event.model, event.input_tokens, event.output_tokens) == ("m", 10, 4)
    after = evolve(state, event)
    assert after.steps == frozenset({1})
    assert after.last_step_index == 1
    assert after.tokens_used == 14
    assert after.version == 2
    assert after.status == "running"


def test_record_steps_batch_emits_one_event_per_step_in_order() -> None:
    cmd = RecordSteps(run_id=RUN, steps=tuple(RecordStep(run_id=RUN, step_index=i) for i in (3, 1)))
    events = decide(_running(), cmd)
    assert [e.step_index for e in events] == [3, 1]  # type: ignore[attr-defined]
    after = fold(_running(), events)
    assert after.steps == frozenset({1, 3})
    assert after.last_step_index == 3


def test_a_step_already_recorded_is_kept_and_marked_duplicate() -> None:
    (event,) = decide(_running(1, 2, 3), RecordStep(run_id=RUN, step_index=3))
    assert isinstance(event, StepRecorded)
    assert "duplicate" in event.irregularities


def test_the_same_step_twice_in_one_batch_marks_the_second_duplicate() -> None:
    cmd = RecordSteps(run_id=RUN, steps=(RecordStep(RUN, 4), RecordStep(RUN, 4)))
    first, second = decide(_running(), cmd)
    assert isinstance(first, StepRecorded) and isinstance(second, StepRecorded)
    assert "duplicate" not in first.irregularities
    assert "duplicate" in second.irregularities


@pytest.mark.parametrize("index", [0, -1])
def test_step_index_below_one_is_invalid(index: int) -> None:
    with pytest.raises(InvalidInput, match="step_index must be >= 1"):
        decide(_running(), RecordStep(run_id=RUN, step_index=index))


def test_recording_on_a_run_never_started_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(_new(), RecordStep(run_id=RUN, step_index=1))


def test_recording_on_a_stopped_run_names_the_stopping_step() -> None:
    with pytest.raises(Conflict, match="stopped_by_policy at step 3"):
        decide(_stopped(3), RecordStep(run_id=RUN, step_index=3))
    with pytest.raises(Conflict, match="stopped_by_policy at step 3"):
        decide(_stopped(3), RecordStep(run_id=RUN, step_index=4))


def test_a_step_before_the_stop_may_still_report_what_it_spent() -> None:
    # Steps 1 and 2 ran in parallel with the violating step 4; step 2 reports after the stop.
    stopped = fold(_running(1), decide(_running(1), _stop(4)))
    (event,) = decide(stopped, RecordStep(run_id=RUN, step_index=2, input_tokens=70))
    assert isinstance(event, StepRecorded)
    after = fold(stopped, [event])
    assert after.status == "stopped_by_policy"
    assert after.tokens_used == 75
    (again,) = decide(after, RecordStep(run_id=RUN, step_index=2))
    assert isinstance(again, StepRecorded)
    assert "duplicate" in again.irregularities


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_recording_on_a_finished_run_is_a_conflict(status: str) -> None:
    state = fold(_running(1), [RunCompleted(run_id=RUN, status=status)])
    with pytest.raises(Conflict, match=f"is {status}"):
        decide(state, RecordStep(run_id=RUN, step_index=2))


# --- finish --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_finishing_a_running_run(status: str) -> None:
    cmd = FinishRun(run_id=RUN, status=status, reason="done")  # type: ignore[arg-type]
    events = decide(_running(1), cmd)
    assert events == [RunCompleted(run_id=RUN, status=status, reason="done")]
    after = fold(_running(1), events)
    assert after.status == status
    assert after.is_terminal
    assert after.end_reason == "done"


def test_finishing_twice_is_a_conflict() -> None:
    done = fold(_running(), [RunCompleted(run_id=RUN, status="completed")])
    with pytest.raises(Conflict, match="is completed"):
        decide(done, FinishRun(run_id=RUN, status="failed"))


def test_finishing_a_stopped_run_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="stopped_by_policy at step 3"):
        decide(_stopped(3), FinishRun(run_id=RUN, status="completed"))


def test_finishing_a_run_never_started_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(_new(), FinishRun(run_id=RUN, status="completed"))


# --- stop for a violation ------------------------------------------------------------------------


def test_a_violation_stops_a_running_run_at_its_step() -> None:
    events = decide(_running(1, 2), _stop(3))
    assert events == [
        RunStoppedByPolicy(
            run_id=RUN, step_index=3, policy_id="token_limit", decision_id="d-1", reason="too many"
        )
    ]
    after = fold(_running(1, 2), events)
    assert after.status == "stopped_by_policy"
    assert after.stopped_at_step == 3
    assert after.violation_policy_id == "token_limit"
    assert after.is_terminal


def test_a_second_violation_on_a_stopped_run_changes_nothing() -> None:
    assert decide(_stopped(3), _stop(4)) == []


def test_a_violation_on_a_finished_run_changes_nothing() -> None:
    done = fold(_running(), [RunCompleted(run_id=RUN, status="failed")])
    assert decide(done, _stop()) == []


def test_a_violation_for_an_unknown_run_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(_new(), _stop())


# --- fold ----------------------------------------------------------------------------------------


def test_fold_rebuilds_the_whole_state_and_counts_versions() -> None:
    events = [
        RunStarted(run_id=RUN, agent_id="a"),
        StepRecorded(run_id=RUN, agent_id="a", step_index=1, input_tokens=3, output_tokens=2),
        StepRecorded(run_id=RUN, agent_id="a", step_index=2, input_tokens=1),
        RunStoppedByPolicy(run_id=RUN, step_index=3, policy_id="p", decision_id="d", reason="r"),
    ]
    state = fold(_new(), events)
    assert state.version == 4
    assert state.steps == frozenset({1, 2})
    assert state.tokens_used == 6
    assert state.last_step_index == 2
    assert (state.status, state.stopped_at_step, state.violation_policy_id) == (
        "stopped_by_policy",
        3,
        "p",
    )
    # Folding in two parts is the same as folding at once (what the handler cache relies on).
    assert fold(fold(_new(), events[:2]), events[2:]) == state
    # evolve one by one agrees with fold.
    one_by_one = _new()
    for e in events:
        one_by_one = evolve(one_by_one, e)
    assert one_by_one == state


def test_to_dict_is_the_get_run_view() -> None:
    view = _stopped(3).to_dict()
    assert view["status"] == "stopped_by_policy"
    assert view["steps"] == [1, 2]
    assert view["stopped_at_step"] == 3
    assert view["tenant_id"] == "acme"
