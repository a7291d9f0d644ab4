"""Two replicas of each scaled-out service give the same results as one.

The same scripted workload (several tenants and runs, parallel admissions against token and cost
budgets, steps in batches, violations that stop runs, incidents acknowledged and resolved, costs)
runs once against the shared system (one process per service) and once against a system started
with ``MC_REPLICAS`` = two processes each of policy-admission, workflow-engine, incident and cost,
sharing their request queue groups, durable consumers and the database. Everything observable,
with ids replaced by labels, must be identical, and nothing may have been applied twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import httpx
import psycopg
import pytest

from services.gateway.client import ApiError, MissionControlClient
from tests.e2e.conftest import (
    RUN_STATE_FIELDS,
    RunningSystem,
    consumers_idle,
    event_counts,
    start_whole_system,
    stop_whole_system,
    wait_for,
)

pytestmark = pytest.mark.e2e

SCALED_OUT = ("policy-admission", "workflow-engine", "incident", "cost")
MODEL = "gpt-4o"
HOUSE_MODEL = "house-model"
BULK_RUNS = 4
BULK_STEPS = 60

T = TypeVar("T")


@pytest.fixture(scope="module")
def replicated_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    replicas = ",".join(f"{name}=2" for name in SCALED_OUT)
    sys_ = start_whole_system(
        tmp_path_factory.mktemp("replicas") / "mc", extra_env={"MC_REPLICAS": replicas}
    )
    yield sys_
    stop_whole_system(sys_)


def _retrying(call: Callable[[], T]) -> T:
    """``call()``, again after ``Retry-After`` while the system answers 429 (it did no work)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return call()
        except ApiError as exc:
            if exc.status != 429 or time.monotonic() > deadline:
                raise
            # Backing off as the answer asks is the client's protocol, not a test synchronisation.
            time.sleep(exc.retry_after or 0.1)


@dataclass
class Outcomes:
    """What one workload saw and left behind, with run and tenant ids replaced by labels."""

    runs: dict[str, str] = field(default_factory=dict)
    """label → run id"""
    tenants: dict[str, str] = field(default_factory=dict)
    """label → tenant id"""
    clients: dict[str, MissionControlClient] = field(default_factory=dict)
    decisions: dict[str, list[tuple[str, tuple[str, ...]]]] = field(default_factory=dict)
    """run label → sorted (outcome, denying policies) of every admission answer"""
    expected_steps: dict[str, int] = field(default_factory=dict)
    """run label → steps recorded (so costed)"""
    stopped: set[str] = field(default_factory=set)
    owner: dict[str, str] = field(default_factory=dict)
    """run label → tenant label"""
    violating_step: dict[str, int] = field(default_factory=dict)
    """run label → the step of a parallel run whose denial was the violation"""

    def admitted(self, label: str, answer: Any) -> bool:
        reasons = tuple(sorted(r.policy_id for r in answer.reasons))
        self.decisions.setdefault(label, []).append((answer.outcome, reasons))
        return bool(answer.outcome == "allow")


def _admit(mc: MissionControlClient, run: str, step: int, model: str, inp: int, out: int) -> Any:
    estimate = {"input_tokens": inp, "max_output_tokens": out}
    return _retrying(lambda: mc.admit(run, step, kind="llm_call", model=model, estimate=estimate))


def _record(mc: MissionControlClient, run: str, step: int, model: str, inp: int, out: int) -> None:
    _retrying(
        lambda: mc.record_step(
            run, step, kind="llm_call", model=model, input_tokens=inp, output_tokens=out
        )
    )


def _scripted_run(
    o: Outcomes, tenant: str, label: str, steps: list[tuple[int, int]], denied: tuple[int, int]
) -> None:
    """Steps admitted and recorded one after the other; then, if given, a step to be denied."""
    mc = o.clients[tenant]
    run = o.runs[label] = _retrying(lambda: mc.start_run(agent_id=f"agent-{label}")).run_id
    o.owner[label] = tenant
    for idx, (inp, out) in enumerate(steps, start=1):
        assert o.admitted(label, _admit(mc, run, idx, MODEL, inp, out)), label
        _record(mc, run, idx, MODEL, inp, out)
    o.expected_steps[label] = len(steps)
    if denied != (0, 0):
        assert not o.admitted(label, _admit(mc, run, len(steps) + 1, MODEL, *denied)), label
        o.stopped.add(label)


def _parallel_run(
    o: Outcomes, tenant: str, label: str, model: str, ask: tuple[int, int], fit: int
) -> None:
    """Ten steps asked for at once of which only ``fit`` fit the budget.

    Admission decides them one after the other: ``fit`` are allowed, the next one is the
    violation that stops the run, the rest are refused because the run has violated a policy.
    Which ask comes next is up to timing, so its step index is recorded to be normalised away.
    """
    mc = o.clients[tenant]
    run = o.runs[label] = _retrying(lambda: mc.start_run(agent_id=f"agent-{label}")).run_id
    o.owner[label] = tenant
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: (i, _admit(mc, run, i, model, *ask)), range(1, 11)))
    allowed = [i for i, a in answers if o.admitted(label, a)]
    assert len(allowed) == fit, (label, allowed)
    violating = [
        i for i, a in answers if a.outcome == "deny" and a.reasons[0].policy_id != "run_state"
    ]
    assert len(violating) == 1, (label, answers)
    o.violating_step[label] = violating[0]
    o.expected_steps[label] = 0
    o.stopped.add(label)


def _bulk_runs(o: Outcomes, tenant: str) -> None:
    """Runs whose steps arrive in one batch each, then complete (costed by whichever replica)."""
    mc = o.clients[tenant]
    for n in range(BULK_RUNS):
        label = f"bulk-{n}"
        run = o.runs[label] = _retrying(lambda: mc.start_run(agent_id="batcher")).run_id
        o.owner[label] = tenant
        items = [
            {
                "run_id": run,
                "step_index": i,
                "kind": "llm_call",
                "model": MODEL,
                "input_tokens": 10 + n,
                "output_tokens": 5,
            }
            for i in range(1, BULK_STEPS + 1)
        ]
        # Every step is admitted before it runs (an unadmitted one would stop the run).
        for i in range(1, BULK_STEPS + 1):
            assert o.admitted(label, _admit(mc, run, i, MODEL, 10 + n, 5)), label
        assert _retrying(partial(mc.record_steps_batch, items)).recorded == BULK_STEPS
        _retrying(partial(mc.finish_run, run, status="completed"))
        o.expected_steps[label] = BULK_STEPS


def run_workload(sys_: RunningSystem) -> Outcomes:
    """The scripted workload, its tenants' parts running at the same time."""
    o = Outcomes()
    for label in ("tokens", "pricey", "bulk"):
        o.tenants[label] = f"{label}{uuid.uuid4().hex[:10]}"
        o.clients[label] = sys_.new_tenant(o.tenants[label])
    _retrying(
        lambda: o.clients["pricey"].set_prices(
            [{"model": HOUSE_MODEL, "input_per_token": "0.004", "output_per_token": "0.004"}]
        )
    )

    def tokens() -> None:
        # The token limit (10,000 per run): seed 000 (step 3 denied), a completed run, an open
        # one, and ten parallel asks for 2,000 tokens each of which exactly five fit.
        _scripted_run(o, "tokens", "seed", [(300, 200), (2000, 3000)], denied=(4500, 5000))
        _scripted_run(o, "tokens", "done", [(2000, 700), (2500, 800), (1500, 500)], (0, 0))
        mc = o.clients["tokens"]
        _retrying(lambda: mc.finish_run(o.runs["done"], status="completed"))
        _scripted_run(o, "tokens", "open", [(2000, 500), (2000, 500)], (0, 0))
        _parallel_run(o, "tokens", "parallel-tokens", MODEL, (1000, 1000), fit=5)

    def pricey() -> None:
        # The cost cap ($10 per run at $0.004 a token): $6, then $4.80 more is denied; and ten
        # parallel asks for $1.60 each of which exactly six fit.
        mc = o.clients["pricey"]
        run = o.runs["cap"] = _retrying(lambda: mc.start_run(agent_id="spender")).run_id
        o.owner["cap"] = "pricey"
        assert o.admitted("cap", _admit(mc, run, 1, HOUSE_MODEL, 1000, 500))
        _record(mc, run, 1, HOUSE_MODEL, 1000, 500)
        assert not o.admitted("cap", _admit(mc, run, 2, HOUSE_MODEL, 800, 400))
        o.expected_steps["cap"] = 1
        o.stopped.add("cap")
        _parallel_run(o, "pricey", "parallel-cost", HOUSE_MODEL, (200, 200), fit=6)

    with ThreadPoolExecutor(3) as pool:
        for f in [pool.submit(tokens), pool.submit(pricey), pool.submit(_bulk_runs, o, "bulk")]:
            f.result()

    settle(o)
    # Incidents move on through whichever incident replica takes the request.
    seed_incident = _incidents_of(o, "seed")[0]["incident_id"]
    cap_incident = _incidents_of(o, "cap")[0]["incident_id"]
    _retrying(lambda: o.clients["tokens"].acknowledge_incident(seed_incident, by="oncall"))
    _retrying(lambda: o.clients["pricey"].acknowledge_incident(cap_incident, by="oncall"))
    _retrying(lambda: o.clients["pricey"].resolve_incident(cap_incident, "raised", by="oncall"))
    wait_for(lambda: _incidents_of(o, "cap")[0]["status"] == "resolved", 30, "resolved")
    wait_for(lambda: _incidents_of(o, "seed")[0]["status"] == "acknowledged", 30, "acknowledged")
    wait_for(lambda: consumers_idle(sys_), 60, "consumers idle")
    return o


def _incidents_of(o: Outcomes, label: str) -> list[dict[str, Any]]:
    mc = o.clients[o.owner[label]]
    return list(mc.incidents(run_id=o.runs[label])["incidents"])


def settle(o: Outcomes) -> None:
    """Wait until every stop, incident and cost of the workload is queryable."""
    for label in sorted(o.runs):
        _settle_run(o, label)


def _settle_run(o: Outcomes, label: str) -> None:
    mc, run, steps = o.clients[o.owner[label]], o.runs[label], o.expected_steps[label]
    if label in o.stopped:
        wait_for(lambda: mc.run(run)["status"] == "stopped_by_policy", 30, f"{label} stopped")
        wait_for(lambda: _incidents_of(o, label), 30, f"{label} incident")

    def costed() -> bool:
        rows = mc.costs(group_by="run", run_id=run)["rows"]
        return bool(rows) and rows[0]["steps"] == steps

    if steps:
        wait_for(costed, 60, f"{label} costed")


def observe(sys_: RunningSystem, o: Outcomes) -> dict[str, Any]:
    """Everything observable about the workload, ids replaced by labels, order made canonical."""
    seen: dict[str, Any] = {"runs": {}, "decisions": {}, "incidents": {}, "costs": {}}
    for label, run in sorted(o.runs.items()):
        mc = o.clients[o.owner[label]]
        view = mc.run(run)
        replay = mc.replay(run)
        assert {k: replay["state"][k] for k in RUN_STATE_FIELDS} == {
            k: view[k] for k in RUN_STATE_FIELDS
        }

        def step(index: Any, label: str = label) -> Any:
            # Which of a parallel run's asks was the violation is up to timing, not replicas.
            violating = o.violating_step.get(label)
            return "violating" if violating is not None and index == violating else index

        seen["runs"][label] = {
            k: step(view[k]) if k == "stopped_at_step" else view[k] for k in RUN_STATE_FIELDS
        }
        seen["decisions"][label] = sorted(o.decisions.get(label, []))
        seen["incidents"][label] = sorted(
            (i["policy_id"], step(i["step_index"]), i["status"]) for i in _incidents_of(o, label)
        )
        rows = mc.costs(group_by="run", run_id=run)["rows"]
        seen["costs"][label] = [(r["steps"], r["total_cost_usd"]) for r in rows]
    seen["events"] = {t: event_counts(sys_.admin_url, o.tenants[t]) for t in sorted(o.tenants)}
    return seen


# Event types whose (run, step) identifies one effect: two of them are an effect applied twice.
ONCE_PER_RUN_STEP = (
    "run.started",
    "run.step_recorded",
    "run.completed",
    "run.stopped_by_policy",
    "admission.decided",
    "policy.violation_detected",
    "incident.opened",
    "cost.recorded",
)


def duplicated_effects(sys_: RunningSystem, o: Outcomes) -> list[tuple[Any, ...]]:
    """Events of the workload's tenants recorded more than once for the same run and step."""
    with psycopg.connect(sys_.admin_url) as conn:
        rows = conn.execute(
            "SELECT event_type, payload->>'run_id', payload->>'step_index', count(*) "
            "FROM eventstore.events WHERE tenant_id = ANY(%s) AND event_type = ANY(%s) "
            "GROUP BY 1, 2, 3 HAVING count(*) > 1",
            (list(o.tenants.values()), list(ONCE_PER_RUN_STEP)),
        ).fetchall()
        # Each activation once per stream (tenant and environment): replicas starting together
        # must not each record the repository bundle's, while one tenant may rightly activate
        # the same bundle in both of its environments (aligning them).
        bundles = conn.execute(
            "SELECT stream_id, payload->>'bundle_digest', count(*) FROM eventstore.events "
            "WHERE event_type = 'policy.bundle_activated' GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
    return [tuple(r) for r in rows] + [("policy.bundle_activated", *b) for b in bundles]


def served(url: str, metric: str) -> float:
    """The total of ``metric`` (all its label sets) on the process at ``url``'s /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric + "{") or line.startswith(metric + " ")
    )


def test_two_replicas_of_each_service_give_the_same_results_as_one(
    whole_system: RunningSystem, replicated_system: RunningSystem
) -> None:
    replicated_system.refresh()
    services = [c for c in replicated_system.state["children"] if c["kind"] == "service"]
    for name in SCALED_OUT:
        assert len([c for c in services if c["service"] == name]) == 2, name
    assert len([c for c in services if c["service"] == "audit-replay"]) == 1

    one = run_workload(whole_system)
    two = run_workload(replicated_system)
    expected = observe(whole_system, one)
    got = observe(replicated_system, two)

    # The budgets held under parallelism, with one replica as with two.
    for seen in (expected, got):
        tally = {
            label: [outcome for outcome, _ in seen["decisions"][label]].count("allow")
            for label in ("parallel-tokens", "parallel-cost")
        }
        assert tally == {"parallel-tokens": 5, "parallel-cost": 6}
        assert all(len(seen["incidents"][label]) == 1 for label in one.stopped)
        assert all(not seen["incidents"][label] for label in set(one.runs) - one.stopped)
    assert got["runs"] == expected["runs"]
    assert got["decisions"] == expected["decisions"]
    assert got["incidents"] == expected["incidents"]
    assert got["costs"] == expected["costs"]
    assert got["events"] == expected["events"]
    assert duplicated_effects(whole_system, one) == []
    assert duplicated_effects(replicated_system, two) == []

    # Both admission replicas answered: the work was shared, not served by one of them (each
    # of the ~30 requests goes to a replica of the queue group at random).
    admission = [c["url"] for c in services if c["service"] == "policy-admission"]
    decided = [served(url, "mc_admission_decision_seconds_count") for url in admission]
    assert all(decided), decided
