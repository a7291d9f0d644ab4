"""Live tokens through the public API: a worker streams a call's usage with the SDK, an SSE client
sees the counts move before the step is recorded, a reconnect with ``Last-Event-ID`` resumes with
nothing twice and nothing missing, heartbeats arrive, the connection's consumers go with it, and
a budget stops a step mid-way (the handler gets the abort, the stop is in the store, the execution
shows why).

The whole system runs (``mctl up``); the agent is served by the SDK's worker in a thread. The
handler waits on gates the test opens only after it saw what it waits for: no sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
import psycopg

from libs.eventbus.jetstream import connect
from services.gateway.worker import Step, StepAborted, Worker
from tests.e2e.conftest import RunningSystem, wait_for

MODEL = "gpt-4o-mini"
WORKFLOW = {
    "name": "streamer",
    "steps": [{"id": "talk", "agent": "speaker", "estimate": {"cost_usd": "0.01"},
               "timeout_s": 120}],
}  # fmt: skip
MOVE = [100, 200, 300, 600]
"""Output tokens the first execution reports: two seen live, two while the viewer is away."""
STOP = [1_000, 40_000]
"""The second execution's: $0.00075 fits its $0.02 budget, $0.02415 does not."""


@dataclass
class Scenario:
    outputs: list[int]
    gates: list[threading.Event]
    reported: list[int] = field(default_factory=list)
    throttled: list[bool] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    run_id: str = ""
    done: threading.Event = field(default_factory=threading.Event)


def scenario(outputs: list[int]) -> Scenario:
    return Scenario(outputs, [threading.Event() for _ in outputs])


class SseReader:
    """Reads an event stream in a thread: messages (id, event, data) and heartbeat comments."""

    def __init__(self, http: httpx.Client, url: str, last_event_id: str | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.status = 0
        self.closed = threading.Event()
        self.stop = threading.Event()
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self._thread = threading.Thread(target=self._read, args=(http, url, headers), daemon=True)
        self._thread.start()

    def _read(self, http: httpx.Client, url: str, headers: dict[str, str]) -> None:
        try:
            with http.stream("GET", url, headers=headers, timeout=60) as resp:
                self.status = resp.status_code
                current: dict[str, Any] = {}
                for line in resp.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(": heartbeat"):
                        self.heartbeats += 1
                    elif line.startswith(("id: ", "event: ")):
                        key, _, value = line.partition(": ")
                        current[key] = value
                    elif line.startswith("data: "):
                        current["data"] = orjson.loads(line[len("data: ") :])
                    elif line == "" and current:
                        self.messages.append(current)
                        current = {}
        finally:
            self.closed.set()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["event"] == event]

    def usage(self) -> list[int]:
        return [m["data"]["output_tokens"] for m in self.of("usage")]

    def close(self) -> None:
        self.stop.set()  # the next heartbeat ends the read
        assert self.closed.wait(30), "the reader did not stop"


def _ephemeral_consumers(sys_: RunningSystem) -> int:
    async def count() -> int:
        nc = await connect(sys_.nats_url, "e2e-live", sys_.nats_credentials())
        try:
            js = nc.jetstream()
            infos = [*await js.consumers_info("MC_EVENTS"), *await js.consumers_info("MC_LIVE")]
            return sum(1 for i in infos if not i.config.durable_name)
        finally:
            await nc.close()

    return asyncio.run(count())


def _serve(worker: Worker, scenarios: dict[str, Scenario]) -> None:
    @worker.agent("speaker")
    async def talk(step: Step) -> str:
        plan = scenarios[step.inputs["scenario"]]
        plan.run_id = step.run_id
        await step.admit(model=MODEL, input_tokens=1000, max_output_tokens=5_000)
        try:
            for gate, out in zip(plan.gates, plan.outputs, strict=True):
                assert await asyncio.to_thread(gate.wait, 60), "the test never opened the gate"
                got = await step.report_usage(
                    model=MODEL, input_tokens=1000, output_tokens=out, force=True
                )
                assert got is not None and got.abort is False
                plan.reported.append(out)
                # Straight after a report, another is throttled (not sent).
                again = await step.report_usage(model=MODEL, input_tokens=1000, output_tokens=out)
                plan.throttled.append(again is None)
        except StepAborted as exc:
            plan.aborted.append(exc.reason)
            raise
        finally:
            plan.done.set()
        await step.record(model=MODEL, input_tokens=1000, output_tokens=plan.outputs[-1])
        return "said"


def test_live_tokens_stream_resume_and_stop_mid_way(whole_system: RunningSystem) -> None:
    tenant = f"lv{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    auth = {"Authorization": f"Bearer {key}"}
    http = httpx.Client(base_url=whole_system.gateway_url, headers=auth, timeout=30)
    assert http.post("/v1/agents", json={"agent_id": "speaker"}).status_code == 201
    assert http.post("/v1/workflows", json=WORKFLOW).status_code == 201
    baseline = _ephemeral_consumers(whole_system)

    scenarios = {"move": scenario(MOVE), "stop": scenario(STOP)}
    worker = Worker(whole_system.gateway_url, key, poll_s=2)
    _serve(worker, scenarios)
    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    try:
        _moving_tokens_and_resume(whole_system, http, scenarios["move"], baseline)
        _stopped_mid_way(whole_system, http, scenarios["stop"], tenant)
    finally:
        for plan in scenarios.values():
            for gate in plan.gates:
                gate.set()
        worker.stop()
        thread.join(30)
    wait_for(
        lambda: _ephemeral_consumers(whole_system) == baseline,
        30,
        "every stream's consumers deleted once its client left",
        interval=0.5,
    )


def _until(reader: SseReader, what: str, predicate: Callable[[], bool]) -> None:
    wait_for(predicate, 60, what)
    assert reader.status == 200, reader.status


def _moving_tokens_and_resume(
    sys_: RunningSystem, http: httpx.Client, plan: Scenario, baseline: int
) -> None:
    eid = http.post("/v1/workflows/streamer/executions", json={"inputs": {"scenario": "move"}})
    assert eid.status_code == 201, eid.text
    execution_id = eid.json()["execution_id"]
    url = f"/v1/executions/{execution_id}/events?heartbeat_s=1"

    first = SseReader(http, url)
    _until(first, "the snapshot", lambda: bool(first.of("snapshot")))
    assert first.of("snapshot")[0]["data"]["execution_id"] == execution_id
    # Nothing happens until the gate opens: the stream sends heartbeats meanwhile.
    _until(first, "a heartbeat", lambda: first.heartbeats >= 1)
    assert _ephemeral_consumers(sys_) == baseline + 2  # one on MC_EVENTS, one on MC_LIVE

    # The counts move while the call runs: each report is seen before the next is made, and
    # the step is recorded only after the last gate, so none of this is a recorded step.
    for i in (0, 1):
        plan.gates[i].set()
        _until(first, f"usage {MOVE[i]}", lambda i=i: first.usage() == MOVE[: i + 1])
    assert not first.of("run.step_recorded")
    wait_for(lambda: plan.throttled == [True, True], 30, "the handler's throttled reports")
    usage = first.of("usage")[-1]["data"]
    assert (usage["run_id"], usage["step_id"], usage["input_tokens"]) == (plan.run_id, "talk", 1000)
    assert usage["abort"] is False and usage["cost_usd"] == "0.00027"  # 1000 x .15/M + 200 x .6/M
    resume_at = first.messages[-1]["id"]
    first.close()

    # Away: two more reports and the step's end happen without a viewer.
    for i in (2, 3):
        plan.gates[i].set()
    assert plan.done.wait(60)
    done = wait_for(
        lambda: http.get(f"/v1/executions/{execution_id}").json()["status"] == "completed",
        60,
        "the execution completed",
    )
    assert done

    second = SseReader(http, url, last_event_id=resume_at)
    _until(second, "the end", lambda: bool(second.of("end")))
    assert not second.of("snapshot")  # a resume carries on; it does not start again
    assert second.usage() == MOVE[2:], second.messages  # nothing twice, nothing missing
    # Each stream in its order (between the two, a replay interleaves as they arrive).
    # The cost service prices the step on its own time, so its cost.recorded may come before or
    # after the execution's end; the stream's end comes last.
    kinds = [m["event"] for m in second.messages if m["event"] != "usage"]
    assert kinds[0] == "run.step_recorded" and kinds[-1] == "end", kinds
    assert "execution.completed" in kinds and kinds.count("run.step_recorded") == 1, kinds
    # Each id is past the one before: the two connections read one sequence, once.
    ids = [tuple(map(int, m["id"].split("-"))) for m in [*first.messages, *second.messages]
           if "id" in m]  # fmt: skip
    assert all(a < b for a, b in itertools.pairwise(ids)), ids
    assert second.closed.wait(30)  # the server closed it after `end`

    # A stream of a run that has ended: its snapshot, then its end.
    ended = SseReader(http, f"/v1/runs/{plan.run_id}/events")
    assert ended.closed.wait(30)
    assert [m["event"] for m in ended.messages] == ["snapshot", "end"]
    assert ended.of("snapshot")[0]["data"]["status"] == "completed"


def _stopped_mid_way(sys_: RunningSystem, http: httpx.Client, plan: Scenario, tenant: str) -> None:
    body = {"inputs": {"scenario": "stop"}, "budget_usd": "0.02"}
    started = http.post("/v1/workflows/streamer/executions", json=body)
    assert started.status_code == 201, started.text
    execution_id = started.json()["execution_id"]
    viewer = SseReader(http, f"/v1/executions/{execution_id}/events?heartbeat_s=1")
    _until(viewer, "the snapshot", lambda: bool(viewer.of("snapshot")))

    plan.gates[0].set()
    _until(viewer, "the first usage", lambda: viewer.usage() == STOP[:1])
    plan.gates[1].set()  # 40,000 output tokens: more than the execution's budget can take
    assert plan.done.wait(60)
    (reason,) = plan.aborted  # the handler got the abort
    assert reason.startswith(f"budget execution:{execution_id}:execution (")
    assert "step 'talk' was stopped mid-way: its streamed cost $0.02415 does not fit" in reason
    assert plan.reported == STOP[:1]

    _until(viewer, "the end", lambda: bool(viewer.of("end")))
    kinds = [m["event"] for m in viewer.messages]
    assert kinds.index("execution.step_stopped") < kinds.index("execution.failed")
    stopped = viewer.of("execution.step_stopped")[0]["data"]["payload"]
    assert stopped["output_tokens"] == 40_000
    assert Decimal(stopped["streamed_cost_usd"]) == Decimal("0.02415")
    # The run's stream, from the start of its live reports: the stopping one says abort. (It
    # may reach the gateway after the execution's end, so it is read from the run's stream.)
    events_seq = viewer.messages[-2]["id"].split("-")[0]
    run_view = SseReader(http, f"/v1/runs/{plan.run_id}/events", last_event_id=f"{events_seq}-0")
    assert run_view.closed.wait(30)
    assert run_view.usage() == STOP and run_view.messages[-1]["event"] == "end"
    stop_usage = run_view.of("usage")[-1]["data"]
    assert stop_usage["abort"] is True and stop_usage["reason"] == reason

    view = http.get(f"/v1/executions/{execution_id}").json()
    assert view["status"] == "failed" and view["reason"] == reason
    assert view["steps"][0]["state"] == "blocked" and view["steps"][0]["reason"] == reason
    with psycopg.connect(sys_.admin_url) as conn:
        rows = conn.execute(
            "SELECT payload->>'run_id', payload->>'reason' FROM eventstore.events"
            " WHERE tenant_id = %s AND event_type = 'execution.step_stopped'",
            (tenant,),
        ).fetchall()
    assert rows == [(plan.run_id, reason)]

    # Another tenant sees nothing of it; unknown ids and bad cursors are refused plainly.
    other = httpx.Client(
        base_url=sys_.gateway_url,
        headers={"Authorization": f"Bearer {sys_.key_for(tenant + 'x')}"},
        timeout=30,
    )
    assert other.get(f"/v1/executions/{execution_id}/events").status_code == 404
    assert other.get(f"/v1/runs/{plan.run_id}/events").status_code == 404
    missing = http.get("/v1/executions/no-such-execution/events")
    assert missing.status_code == 404 and "not found" in missing.text
    bad = http.get(f"/v1/executions/{execution_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.text
    late = http.post(f"/v1/runs/{plan.run_id}/steps/1/usage", json={"output_tokens": 1})
    assert late.status_code == 200 and late.json()["abort"] is True
    assert late.json()["reason"] == reason
