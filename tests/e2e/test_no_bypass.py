"""No bypass, through the public HTTP API of the whole system: a step recorded without asking
admission is accepted (never lost), and the run is stopped at it with an ``admission_required``
incident, exactly as a denied step would have stopped it."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.conftest import RunningSystem, wait_for

pytestmark = pytest.mark.e2e


def test_a_step_recorded_without_admission_stops_the_run_and_opens_an_incident(
    whole_system: RunningSystem,
) -> None:
    mc = whole_system.new_tenant(f"bypass{uuid.uuid4().hex[:10]}")
    run = mc.start_run(agent_id="sneaky-agent").run_id
    recorded = mc.record_step(run, 1, kind="llm_call", model="gpt-4o", input_tokens=900)
    assert recorded.recorded == 1  # 201: the step is kept

    # The stop travels the projection's control lane, the step its bulk lane (flushed less
    # often): wait until both are in, so the check below is about what was kept, not timing.
    stopped = wait_for(
        lambda: (r := mc.run(run))["status"] == "stopped_by_policy" and r["tokens_used"] and r,
        60,
        "run stopped with its step's tokens",
    )
    assert stopped["violation_policy_id"] == "admission_required"
    assert stopped["stopped_at_step"] == 1
    assert stopped["tokens_used"] == 900  # what the step spent is on record

    # The trace keeps the step, marked, as the point where the run went wrong.
    trace = mc.trace(run)
    (step,) = trace["steps"]
    assert (step["step_index"], step["irregularities"], step["decision"]) == (
        1,
        ["unadmitted"],
        None,
    )
    assert trace["inflection_point"]["policy_id"] == "admission_required"

    incidents = wait_for(lambda: mc.incidents(run_id=run)["incidents"], 60, "incident")
    assert [(i["policy_id"], i["step_index"]) for i in incidents] == [("admission_required", 1)]

    # The run admits nothing more.
    again = mc.admit(
        run,
        2,
        kind="llm_call",
        model="gpt-4o",
        estimate={"input_tokens": 1, "max_output_tokens": 1},
    )
    assert again.outcome == "deny"
