"""The audit service's pure projection, folds, trace shaping and replay."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import (
    AdmissionDecided,
    CostRecorded,
    IncidentAcknowledged,
    IncidentOpened,
    IncidentResolved,
    PolicyBundleActivated,
    PolicyInfo,
    PolicyViolationDetected,
    Reason,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)
from services.audit_replay.domain import (
    ReplayState,
    RunRow,
    StepFacts,
    evolve_incident,
    evolve_replay,
    evolve_run,
    inflection_point,
    project,
    project_steps,
    refold_incident,
    refold_run,
    replay_answer,
    safe_decode,
    trace_csv,
    trace_steps,
)

pytestmark = pytest.mark.unit

POLICY = "max-tokens-per-run"
BUNDLE = "sha256:bundle1"


def flow(tenant: str, run_id: str, *, agent: str = "agent-1") -> list[EventEnvelope]:
    """A realistic run's events, in append order (not yet stored: no positions).

    Two allowed steps are recorded and costed (the first priced, the second unpriced), the third
    is denied: violation, run stopped at step 3, incident opened.
    """
    corr = f"corr-{run_id}"

    def env(event: DomainEvent, category: str, entity: str, t: str = tenant) -> EventEnvelope:
        return envelope_for(
            event,
            tenant_id=t,
            stream_id=stream_id_for(t, category, entity),
            correlation_id=corr,
            actor="test",
        )

    reason = Reason(policy_id=POLICY, severity="high", message="token budget 500 exceeded")
    out = [
        env(RunStarted(run_id=run_id, agent_id=agent), "run", run_id),
    ]
    for i, (tin, tout) in enumerate(((100, 50), (200, 80)), start=1):
        out.append(
            env(
                AdmissionDecided(
                    decision_id=f"{run_id}-d{i}",
                    run_id=run_id,
                    agent_id=agent,
                    step_index=i,
                    outcome="allow",
                    bundle_digest=BUNDLE,
                ),
                "decisions",
                run_id,
            )
        )
        out.append(
            env(
                StepRecorded(
                    run_id=run_id,
                    agent_id=agent,
                    step_index=i,
                    model="gpt-4o" if i == 1 else "in-house-model",
                    input_tokens=tin,
                    output_tokens=tout,
                    duration_ms=12.5,
                    input={"prompt": f"p{i}"},
                    output={"text": f"o{i}"},
                ),
                "run",
                run_id,
            )
        )
        priced = i == 1
        out.append(
            env(
                CostRecorded(
                    cost_id=f"{run_id}-c{i}",
                    run_id=run_id,
                    agent_id=agent,
                    step_index=i,
                    model="gpt-4o" if priced else "in-house-model",
                    input_tokens=tin,
                    output_tokens=tout,
                    pricing_status="priced" if priced else "unpriced",
                    input_cost_usd=Decimal("0.00025") if priced else None,
                    output_cost_usd=Decimal("0.0005") if priced else None,
                    total_cost_usd=Decimal("0.00075") if priced else None,
                    price_table_version="default-1",
                ),
                "cost",
                run_id,
            )
        )
    out += [
        env(
            AdmissionDecided(
                decision_id=f"{run_id}-d3",
                run_id=run_id,
                agent_id=agent,
                step_index=3,
                outcome="deny",
                reasons=[reason],
                bundle_digest=BUNDLE,
                context={
                    "tokens_used": 430,
                    "step": {"kind": "llm_call", "model": "gpt-4o", "tool": None},
                    "estimate": {"input_tokens": 300, "max_output_tokens": 400},
                },
            ),
            "decisions",
            run_id,
        ),
        env(
            PolicyViolationDetected(
                violation_id=f"{run_id}-v3",
                decision_id=f"{run_id}-d3",
                run_id=run_id,
                agent_id=agent,
                step_index=3,
                policy_id=POLICY,
                severity="high",
                message=reason.message,
                bundle_digest=BUNDLE,
            ),
            "decisions",
            run_id,
        ),
        env(
            RunStoppedByPolicy(
                run_id=run_id,
                step_index=3,
                policy_id=POLICY,
                decision_id=f"{run_id}-d3",
                reason=reason.message,
            ),
            "run",
            run_id,
        ),
        env(
            IncidentOpened(
                incident_id=f"{run_id}-i1",
                violation_id=f"{run_id}-v3",
                run_id=run_id,
                agent_id=agent,
                policy_id=POLICY,
                step_index=3,
                severity="high",
                title="Token budget exceeded",
            ),
            "incident",
            f"{run_id}-i1",
        ),
    ]
    return out


def bundle_event(digest: str = BUNDLE) -> EventEnvelope:
    """The shared policy bundle being activated (tenant ``system``)."""
    return envelope_for(
        PolicyBundleActivated(
            bundle_digest=digest,
            policies=[
                PolicyInfo(policy_id=POLICY, title="Token budget per run", severity="high"),
                PolicyInfo(policy_id="no-shell", title="No shell tool", severity="critical"),
            ],
        ),
        tenant_id="system",
        stream_id=stream_id_for("system", "policy", "bundle"),
        correlation_id="boot",
        actor="test",
    )


def stored(envs: list[EventEnvelope], start: int = 1) -> list[EventEnvelope]:
    """``envs`` as the store would return them: positions, versions and record times set."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    versions: dict[str, int] = {}
    out = []
    for i, e in enumerate(envs):
        versions[e.stream_id] = versions.get(e.stream_id, 0) + 1
        out.append(
            e.model_copy(
                update={
                    "position": start + i,
                    "stream_version": versions[e.stream_id],
                    "recorded_at": t0 + timedelta(seconds=i),
                }
            )
        )
    return out


def test_project_turns_a_flow_into_rows_per_table() -> None:
    envs = stored([bundle_event(), *flow("acme", "r1")])
    p = project(envs, {}, {})
    assert len(p.rows["events"]) == len(envs)  # every event is kept raw, projected or not
    assert [s["step_index"] for s in p.rows["steps"]] == [1, 2]
    assert [d["outcome"] for d in p.rows["decisions"]] == ["allow", "allow", "deny"]
    assert p.rows["decisions"][2]["policy_ids"] == [POLICY]
    assert [c["pricing_status"] for c in p.rows["costs"]] == ["priced", "unpriced"]
    assert {r["policy_id"] for r in p.rows["policies"]} == {POLICY, "no-shell"}
    assert p.rows["policies"][0]["tenant_id"] == "system"
    # One run row at its final state, versioned by the last run event's position.
    (run,) = p.rows["runs"]
    stop = next(e for e in envs if e.event_type == "run.stopped_by_policy")
    assert run["status"] == "stopped_by_policy"
    assert run["stopped_at_step"] == 3
    assert run["violation_policy_id"] == POLICY
    assert run["violation_decision_id"] == "r1-d3"
    assert run["agent_id"] == "agent-1"
    assert run["last_step_index"] == 2
    assert run["version"] == stop.position
    assert run["stream_version"] == 4  # started, two steps, stopped: all folded, no gap
    (incident,) = p.rows["incidents"]
    assert incident["status"] == "open"
    assert incident["policy_id"] == POLICY
    assert p.last_position == envs[-1].position


def test_run_fields_are_carried_forward_across_batches() -> None:
    envs = stored(flow("acme", "r1"))
    first, rest = envs[:3], envs[3:]
    p1 = project(first, {}, {})
    started = p1.runs[("acme", "r1")]
    assert started.started_at == envs[0].occurred_at
    # The second batch knows the run only through the state handed in.
    p2 = project(rest, p1.runs, p1.incidents)
    (run,) = p2.rows["runs"]
    assert run["started_at"] == envs[0].occurred_at
    assert run["agent_id"] == "agent-1"
    assert run["status"] == "stopped_by_policy"
    assert run["last_step_index"] == 2


def test_a_redelivered_or_older_run_event_changes_nothing() -> None:
    envs = stored(flow("acme", "r1"))
    state = project(envs, {}, {}).runs
    again = project(envs, state, {})
    assert again.rows["runs"] == []
    assert again.refold_runs == set()  # proven duplicates: no store read needed
    start = envs[0]
    decoded = safe_decode(start)
    assert decoded is not None
    final = state[("acme", "r1")]
    assert evolve_run(final, start, decoded) is final


def test_runs_of_different_tenants_never_share_state() -> None:
    envs = stored([*flow("acme", "r1"), *flow("globex", "r1")])
    p = project(envs, {}, {})
    assert {(r["tenant_id"], r["run_id"]) for r in p.rows["runs"]} == {
        ("acme", "r1"),
        ("globex", "r1"),
    }


def test_undecodable_events_are_stored_but_not_projected() -> None:
    bad = stored(flow("acme", "r1"))[2].model_copy(update={"payload": {"nonsense": True}})
    unknown = bad.model_copy(update={"event_type": "run.teleported", "position": 99})
    p = project([bad, unknown], {}, {})
    assert len(p.rows["events"]) == 2
    assert p.rows["steps"] == []
    assert p.rows["runs"] == []


def test_incident_fold_keeps_resolved_over_a_late_acknowledgement() -> None:
    opened, *_ = stored(flow("acme", "r1"))[-1:]
    ack = stored(
        [
            envelope_for(
                IncidentAcknowledged(incident_id="r1-i1", by="ann"),
                tenant_id="acme",
                stream_id=opened.stream_id,
                correlation_id="c",
                actor="ann",
            ),
            envelope_for(
                IncidentResolved(incident_id="r1-i1", by="bob", resolution="budget raised"),
                tenant_id="acme",
                stream_id=opened.stream_id,
                correlation_id="c",
                actor="bob",
            ),
        ],
        start=100,
    )
    row = None
    for e in (opened, *ack):
        ev = safe_decode(e)
        assert ev is not None
        row = evolve_incident(row, e, ev)
    assert row is not None
    assert row.status == "resolved"
    assert row.acknowledged_by == "ann"
    assert row.resolution == "budget raised"
    late_ack = ack[0].model_copy(update={"position": 200})
    ev = safe_decode(late_ack)
    assert ev is not None
    after = evolve_incident(row, late_ack, ev)
    assert after is not None
    assert after.status == "resolved"


def test_trace_marks_the_denied_step_as_inflection_point_with_a_synthetic_entry() -> None:
    envs = stored(flow("acme", "r1"))
    p = project(envs, {}, {})
    run = p.runs[("acme", "r1")]
    inflection = inflection_point(run, p.rows["decisions"])
    assert inflection == {
        "step_index": 3,
        "policy_id": POLICY,
        "decision_id": "r1-d3",
        "reason": "token budget 500 exceeded",
    }
    steps = trace_steps(p.rows["steps"], p.rows["decisions"], p.rows["costs"], inflection)
    assert [(s["step_index"], s["status"], s["inflection"]) for s in steps] == [
        (1, "ok", False),
        (2, "ok", False),
        (3, "denied", True),
    ]
    assert steps[2]["decision"]["outcome"] == "deny"
    # The denied step never ran, but the trace still shows what it asked for, and when.
    assert (steps[2]["kind"], steps[2]["model"]) == ("llm_call", "gpt-4o")
    assert steps[2]["estimate"] == {"input_tokens": 300, "max_output_tokens": 400}
    assert steps[2]["occurred_at"] is not None
    assert steps[0]["decision"]["outcome"] == "allow"
    assert steps[0]["cost"]["total_cost_usd"] == "0.0007500000"
    assert steps[1]["cost"]["total_cost_usd"] is None
    assert steps[1]["cost"]["pricing_status"] == "unpriced"


def test_inflection_point_falls_back_to_the_deny_decision_and_is_none_without_one() -> None:
    envs = stored(flow("acme", "r1"))
    p = project(envs, {}, {})
    running = replace(p.runs[("acme", "r1")], status="running", stopped_at_step=None)
    fallback = inflection_point(running, p.rows["decisions"])
    assert fallback is not None
    assert (fallback["step_index"], fallback["policy_id"]) == (3, POLICY)
    allowed = [d for d in p.rows["decisions"] if d["outcome"] == "allow"]
    assert inflection_point(running, allowed) is None
    assert inflection_point(None, []) is None


def test_replay_folds_to_the_same_run_as_the_projection() -> None:
    envs = stored(flow("acme", "r1"))
    state = ReplayState()
    for e in envs:
        state = evolve_replay(state, e)
    answer = replay_answer(state)
    projected: RunRow = project(envs, {}, {}).runs[("acme", "r1")]
    assert state.run == projected
    view = answer["state"]
    assert view["status"] == "stopped_by_policy"
    assert view["tokens_used"] == 100 + 50 + 200 + 80
    assert view["cost_usd"] == "0.0007500000"
    assert view["unpriced_steps"] == 1
    assert view["incident_ids"] == ["r1-i1"]
    assert answer["events_applied"] == len(envs)
    assert answer["inflection_point"]["step_index"] == 3
    assert answer["at_position"] == envs[-1].position


def test_replay_before_the_denial_shows_a_running_run_without_inflection() -> None:
    envs = stored(flow("acme", "r1"))
    state = ReplayState()
    for e in envs[:4]:  # started, allow 1, step 1, cost 1
        state = evolve_replay(state, e)
    answer = replay_answer(state)
    assert answer["state"]["status"] == "running"
    assert answer["state"]["tokens_used"] == 150
    assert answer["inflection_point"] is None


def test_trace_csv_has_a_header_and_one_row_per_step() -> None:
    envs = stored(flow("acme", "r1"))
    p = project(envs, {}, {})
    run = p.runs[("acme", "r1")]
    inflection = inflection_point(run, p.rows["decisions"])
    steps = trace_steps(p.rows["steps"], p.rows["decisions"], p.rows["costs"], inflection)
    lines = trace_csv({"steps": steps}).splitlines()
    assert lines[0].startswith("step_index,status,kind,model")
    assert len(lines) == 4
    assert lines[3].startswith("3,denied,")
    assert lines[3].endswith(",true")


def _stream(envs: list[EventEnvelope], category: str, entity: str) -> list[EventEnvelope]:
    sid = stream_id_for("acme", category, entity)
    return [e for e in envs if e.stream_id == sid]


def test_a_late_run_started_is_refolded_from_the_stream_not_dropped() -> None:
    envs = stored(flow("acme", "r1"))
    key = ("acme", "r1")
    in_order = project(envs, {}, {}).runs[key]
    started, rest = envs[0], envs[1:]
    # The batch holding run.started failed and is retried later; the rest was projected.
    early = project(rest, {}, {})
    assert early.runs[key].started_at is None
    assert early.runs[key].stream_version == 0  # version 1 is missing: nothing proven
    late = project([started], early.runs, early.incidents)
    assert late.refold_runs == {key}
    assert late.rows["runs"] == []  # not folded onto the newer state, and not dropped either
    refolded = refold_run(_stream(envs, "run", "r1"))
    assert refolded is not None
    late.apply_refolds({key: refolded}, {})
    (row,) = late.rows["runs"]
    assert row == asdict(in_order)
    assert row["started_at"] == started.occurred_at
    assert late.refold_runs == set()


def test_an_incident_acknowledged_before_it_was_opened_is_refolded() -> None:
    incident_sid = stream_id_for("acme", "incident", "r1-i1")
    ack = envelope_for(
        IncidentAcknowledged(incident_id="r1-i1", by="ann"),
        tenant_id="acme",
        stream_id=incident_sid,
        correlation_id="c",
        actor="ann",
    )
    envs = stored([*flow("acme", "r1"), ack])
    opened, acked = envs[-2], envs[-1]
    key = ("acme", "r1-i1")
    in_order = project(envs, {}, {}).incidents[key]
    assert (in_order.run_id, in_order.status) == ("r1", "acknowledged")
    first = project([acked], {}, {})
    assert first.incidents[key].run_id == ""
    late = project([opened], first.runs, first.incidents)
    assert late.refold_incidents == {key}
    refolded = refold_incident(_stream(envs, "incident", "r1-i1"))
    assert refolded is not None
    assert refolded == in_order
    late.apply_refolds({}, {key: refolded})
    (row,) = late.rows["incidents"]
    assert (row["run_id"], row["policy_id"], row["status"]) == ("r1", POLICY, "acknowledged")
    # Both in one batch, the acknowledgement first: the same detection.
    both = project([acked, opened], {}, {})
    assert both.refold_incidents == {key}


def test_only_a_gap_free_prefix_proves_a_redelivery() -> None:
    envs = stored(flow("acme", "r1"))
    key = ("acme", "r1")
    run_events = _stream(envs, "run", "r1")
    gapped = project(envs[1:], {}, {}).runs
    # After a gap, an older run event cannot be told from one never delivered: re-fold.
    assert project([run_events[1]], gapped, {}).refold_runs == {key}
    # The newest folded event itself is provably folded.
    assert project([run_events[-1]], gapped, {}).refold_runs == set()
    # Once re-folded, the whole stream is covered and every redelivery is a proven duplicate.
    refolded = refold_run(run_events)
    assert refolded is not None
    assert refolded.stream_version == len(run_events)
    again = project(run_events, {key: refolded}, {})
    assert again.refold_runs == set()
    assert again.rows["runs"] == []


def test_a_late_run_state_refusal_does_not_rewrite_a_finished_runs_trace() -> None:
    envs = stored(flow("acme", "r1"))
    p = project(envs, {}, {})
    allowed_1 = next(d for d in p.rows["decisions"] if d["step_index"] == 1)
    # Somebody asks again for step 1 after the run ended: refused under run_state.
    late = {
        **allowed_1,
        "decision_id": "late",
        "outcome": "deny",
        "policy_ids": ["run_state"],
        "reasons": '[{"policy_id": "run_state", "severity": "high", "message": "run is over"}]',
        "version": 10_000,
    }
    decisions = [*p.rows["decisions"], late]
    completed = replace(p.runs[("acme", "r1")], status="completed", stopped_at_step=None)
    assert inflection_point(completed, [d for d in decisions if d["step_index"] != 3]) is None
    steps = trace_steps(p.rows["steps"], decisions, p.rows["costs"], None)
    assert steps[0]["decision"]["outcome"] == "allow"
    assert not any(s["inflection"] for s in steps)


def _facts(env: EventEnvelope) -> StepFacts:
    p = env.payload
    return StepFacts(
        env.tenant_id, p["run_id"], p["agent_id"], p["step_index"], env.position or 0,
        env.stream_id, env.stream_version,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_bulk_step_fold_equals_the_event_by_event_fold(seed: int) -> None:
    import random

    rnd = random.Random(seed)
    tenant, run = "acme", "r1"
    events = [_run_started(tenant, run)] + [_step(tenant, run, i) for i in range(1, 9)]
    envs = stored(events)
    # Some prefix already folded, then the rest delivered shuffled, with duplicates.
    cut = rnd.randrange(0, len(envs))
    state = project(envs[:cut], {}, {}).runs.get((tenant, run)) if cut else None
    rest = envs[cut:] + rnd.sample(envs, rnd.randrange(0, 4))
    rnd.shuffle(rest)
    steps = [e for e in rest if e.event_type == "run.step_recorded"]
    runs = {(tenant, run): state} if state is not None else {}
    one_by_one = project(steps, runs, {})
    bulk = project_steps([_facts(e) for e in steps], runs)
    assert bulk.runs == one_by_one.runs
    assert bulk.refold_runs == one_by_one.refold_runs


def _run_started(tenant: str, run: str) -> EventEnvelope:
    return envelope_for(
        RunStarted(run_id=run, agent_id="agent-1"),
        tenant_id=tenant, stream_id=stream_id_for(tenant, "run", run), correlation_id="c",
        actor="a",
    )  # fmt: skip


def _step(tenant: str, run: str, index: int) -> EventEnvelope:
    return envelope_for(
        StepRecorded(run_id=run, agent_id="agent-1", step_index=index, input_tokens=1),
        tenant_id=tenant, stream_id=stream_id_for(tenant, "run", run), correlation_id="c",
        actor="a",
    )  # fmt: skip
