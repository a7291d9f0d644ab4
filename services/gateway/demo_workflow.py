"""The workflow part of the demo: one execution of the example workflow, told as it goes.

The tenant's agents are served by the example worker (:mod:`services.gateway.example_worker`),
run in this process. The demo

1. registers the agents and saves the workflow (five steps; ``summarise-code`` and
   ``summarise-issues`` run in parallel between ``gather`` and ``review``; ``publish`` is
   ``irreversible``);
2. signs in as ``demo-admin`` and sets the approval rules: an irreversible step needs one person
   with the role ``approver``;
3. caps each execution of the workflow at :data:`BUDGET_CAP`: the steps' estimates fit, but
   what they commit crosses 80 % of it, so the budget alerts without stopping anything;
4. starts an execution and prints each step dispatched and completed, the usage of each
   streamed call as it grows, the approval wait, and the budget alert;
5. signs in as ``demo-approver`` and approves ``publish`` with a reason, as that person;
6. once the execution has ended and its costs are in, prints its DAG with each step's state,
   its cost by agent and by model, and the approval and the alert as the event log holds them.

Every wait has a deadline; a failure names what did not happen and shows the execution's state.
What the demo did stays in the system to be inspected (the commands are printed at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from libs.contracts import stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.errors import Conflict
from libs.eventbus.store import EventStore
from libs.runtime.state import write_private_json
from libs.usage import Usage
from services.gateway.client import ApiError
from services.gateway.example_worker import (
    WORKFLOW,
    WORKFLOW_ID,
    api,
    build_worker,
    install,
    usage_line,
)
from services.gateway.users import create_user, grant_role

DEADLINE_S = 60.0
"""How long the whole execution may take, approval and costs included."""
POLL_S = 0.1
# How long each simulated model call takes: long enough for a few usage reports per streamed
# call (the SDK sends at most one every 250 ms).
LATENCY_S = 1.0
BUDGET_CAP = Decimal("0.055")
"""Each execution's cap (USD): above the estimates' sum ($0.0515), below 125 % of the cost."""
BUDGET_ID = f"workflow:{WORKFLOW_ID}:execution"
APPROVAL_RULES = {
    "write": {"required": 0},
    "irreversible": {"required": 1, "role": "approver", "sla_s": 600, "on_expiry": "reject"},
}
APPROVAL_REASON = "release notes reviewed: both summaries match the changes"
PEOPLE = {"admin": "demo-admin", "approver": "demo-approver"}
"""The demo's people by role, and their user ids."""
TERMINAL = {"completed", "failed", "aborted"}


class DemoFailed(RuntimeError):
    """What the workflow demo waited for did not happen, or went wrong; the message says which."""


@dataclass(frozen=True)
class Person:
    """A person of the demo who signs in with a password."""

    user_id: str
    role: str
    password: str = field(repr=False)


async def ensure_people(
    pool: AsyncConnectionPool, tenant_id: str, secrets_file: Path
) -> dict[str, Person]:
    """The demo's people, made at the first run: each user is created with a random password,
    kept in ``secrets_file`` (mode 0600) so later runs sign in as the same person, and holds
    their role in ``tenant_id``."""
    stored = _read_passwords(secrets_file)
    people = {}
    for role, name in PEOPLE.items():
        # The user made for this role by an earlier run, if any (its id may carry a suffix).
        user_id = next((u for u in stored if u == name or u.startswith(f"{name}-")), name)
        password = stored.get(user_id)
        if password is None:
            password = secrets.token_urlsafe(24)
            try:
                await create_user(pool, user_id, password, actor="demo")
            except Conflict:
                # Made by a run whose password file is gone (another data directory on the same
                # database): a fresh user of this run's own.
                user_id = f"{name}-{uuid.uuid4().hex[:6]}"
                await create_user(pool, user_id, password, actor="demo")
            stored[user_id] = password
            write_private_json(secrets_file, stored)
        await grant_role(pool, user_id, tenant_id, role, actor="demo")
        people[role] = Person(user_id, role, password)
    return people


def _read_passwords(path: Path) -> dict[str, str]:
    try:
        found: dict[str, str] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return found


async def sign_in(http: httpx.AsyncClient, person: Person) -> str:
    """A bearer token of ``person`` (``POST /v1/auth/token``)."""
    body = {"username": person.user_id, "password": person.password}
    token = await api(http, "POST", "/v1/auth/token", body)
    return str(token["access_token"])


# --- what is printed while the execution runs ------------------------------------------------


class LiveTokens:
    """Prints the token counts of the steps' model calls as they stream, one line per change.

    :func:`follow_live_tokens` reads them from the execution's event stream (the worker reports
    them to Mission Control while its calls stream); :meth:`show` is the one place they are
    printed, whatever reports them.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.last: dict[str, Usage] = {}
        self.updates = 0

    def show(self, step_id: str, model: str, usage: Usage) -> None:
        """Print ``step_id``'s usage so far, unless it is what was printed last for it."""
        if self.last.get(step_id) == usage:
            return
        self.last[step_id] = usage
        self.updates += 1
        self.echo(f"{step_id:<17} tokens so far {usage_line(usage)}  {model}")


async def follow_live_tokens(http: httpx.AsyncClient, execution_id: str, live: LiveTokens) -> None:
    """Follow ``GET /v1/executions/{id}/events`` (server-sent events) and show every ``usage``
    message until the stream's ``end``; the caller cancels it when it has seen enough."""
    path = f"/v1/executions/{execution_id}/events"
    async with http.stream("GET", path, timeout=httpx.Timeout(30, read=None)) as response:
        if response.status_code != 200:
            await response.aread()
            raise DemoFailed(f"GET {path}: {response.status_code} {response.text[:200]}")
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "usage":
                report = json.loads(line.partition(":")[2])
                counts = {name: int(report.get(name) or 0) for name in USAGE_FIELDS}
                live.show(str(report.get("step_id")), str(report.get("model")), Usage(**counts))
            elif line.startswith("data:") and event == "end":
                return
            elif not line:
                event = ""


USAGE_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


@dataclass
class Progress:
    """Prints what changed between two looks at the execution and its budget."""

    echo: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerted_pct: int = 0
    alerts: list[int] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    def execution(self, view: Mapping[str, Any]) -> None:
        """Print each step's new state: dispatched, waiting for approval, approved, ended."""
        for step in view.get("steps", []):
            sid = step["step_id"]
            before = self.steps.get(sid, {"state": "waiting", "attempt": 0})
            approval = step.get("approval") or {}
            seen = (before.get("approval") or {}).get("approvers", [])
            if approval.get("pending") and not (before.get("approval") or {}).get("pending"):
                self.say(
                    f"{sid:<17} waits for approval: {approval['required']} × "
                    f"{approval['role']} ({step['risk_tier']}), until {approval['expires_at']}"
                )
            for who in approval.get("approvers", [])[len(seen) :]:
                self.say(f"{sid:<17} approved by {who}")
            if (step.get("attempt") or 0) > (before.get("attempt") or 0):
                self.say(
                    f"{sid:<17} dispatched to {step['agent_id']} "
                    f"(attempt {step['attempt']}, run {step['run_id']})"
                )
            if step["state"] != before["state"] and step["state"] not in ("waiting", "running"):
                took = step.get("duration_ms")
                detail = f" in {took / 1000:.2f} s" if took is not None else ""
                why = f": {step['reason']}" if step.get("reason") else ""
                self.say(f"{sid:<17} {step['state']}{detail}{why}")
            self.steps[sid] = dict(step)

    def budget(self, listing: Mapping[str, Any]) -> None:
        """Print each budget alert the execution's window announced since the last look."""
        for b in listing.get("budgets", []):
            if b["budget_id"] != BUDGET_ID or b["alerted_pct"] <= self.alerted_pct:
                continue
            self.alerted_pct = b["alerted_pct"]
            self.alerts.append(self.alerted_pct)
            self.say(
                f"budget alert: {BUDGET_ID} reached {self.alerted_pct} % of its "
                f"${b['cap_usd']} cap (spent ${b['spent_usd']}, reserved ${b['reserved_usd']})"
            )


# --- the execution ---------------------------------------------------------------------------


@dataclass
class WorkflowOutcome:
    """What the workflow demo did, for its summary and for tests."""

    execution_id: str
    execution: dict[str, Any]
    approver: str
    budget: dict[str, Any]
    costs: dict[str, list[dict[str, Any]]]
    """The execution's steps' cost rows by model, per attempt run id."""
    live_updates: int
    log: list[EventEnvelope] = field(default_factory=list)
    """The approval and the budget alerts as the event store holds them."""


def _transient(exc: Exception) -> bool:
    """A failure worth asking again: overload, or a service restarting behind the gateway."""
    if isinstance(exc, ApiError):
        return exc.status in (429, 502, 503, 504)
    return isinstance(exc, httpx.TransportError)


async def _until(
    what: str,
    probe: Callable[[], Awaitable[Any]],
    deadline: float,
    state: Callable[[], str] = lambda: "",
) -> Any:
    """Call ``probe`` until it returns something truthy, or fail naming ``what`` (and the
    last transient error, when that is what kept it from answering)."""
    began = time.monotonic()
    last_error = ""
    while True:
        try:
            value = await probe()
        except (ApiError, httpx.HTTPError) as exc:
            if not _transient(exc):
                raise DemoFailed(f"the workflow demo, waiting for {what}: {exc}") from exc
            value, last_error = None, f"; last answer: {exc or type(exc).__name__}"
        if value:
            return value
        if time.monotonic() > deadline:
            where = state()
            raise DemoFailed(
                f"the workflow demo's deadline passed while it waited for {what} (for "
                f"{time.monotonic() - began:.1f}s)" + (f"; {where}" if where else "") + last_error
            )
        await asyncio.sleep(POLL_S)


def describe(view: Mapping[str, Any] | None) -> str:
    """One line of an execution's state for an error message."""
    if not view:
        return "the execution was not readable"
    steps = ", ".join(f"{s['step_id']}={s['state']}" for s in view.get("steps", []))
    reason = f" ({view['reason']})" if view.get("reason") else ""
    return f"execution {view['execution_id']} {view['status']}{reason}: {steps}"


async def run_workflow(
    base_url: str,
    api_key: str,
    tenant_id: str,
    people: Mapping[str, Person],
    echo: Callable[[str], None],
    *,
    deadline_s: float = DEADLINE_S,
) -> WorkflowOutcome:
    """Set up, run and watch one execution of the example workflow (see the module doc) in
    ``tenant_id``, the tenant of ``api_key``."""
    deadline = time.monotonic() + deadline_s
    headers = {"Authorization": f"Bearer {api_key}"}
    # A person may hold roles in several tenants: their calls name the demo's.
    as_person = {"X-Tenant-Id": tenant_id}
    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as agent,
        httpx.AsyncClient(base_url=base_url, headers=as_person, timeout=30) as person,
    ):
        version = await _step("save the workflow", install(agent))
        echo(f"workflow {WORKFLOW_ID} version {version}: " + _shape(WORKFLOW["steps"]))
        admin = await _step("sign in as the admin", sign_in(person, people["admin"]))
        rules = await _step(
            "set the approval rules",
            api(person, "PUT", "/v1/approval-rules", APPROVAL_RULES, auth=admin),
        )
        gate = rules["rules"]["irreversible"]
        echo(
            f"approval rules (set by user:{people['admin'].user_id}): an irreversible step "
            f"needs {gate['required']} × {gate['role']}, SLA {gate['sla_s']:.0f} s"
        )
        budget = {"scope": "workflow", "subject": WORKFLOW_ID, "window": "execution",
                  "cap_usd": str(BUDGET_CAP)}  # fmt: skip
        await _step("set the budget", api(agent, "PUT", "/v1/budgets", budget))
        estimate = sum(Decimal(s["estimate"]["cost_usd"]) for s in WORKFLOW["steps"])
        echo(f"budget {BUDGET_ID}: ${BUDGET_CAP} per execution (the steps estimate ${estimate})")
        approver = await _step("sign in as the approver", sign_in(person, people["approver"]))

        progress = Progress(echo)
        live = LiveTokens(progress.say)
        # The worker reports each streamed call's usage to Mission Control as it grows; the
        # demo reads it back from the execution's event stream, as any viewer would.
        worker = build_worker(base_url, api_key, latency_s=LATENCY_S, poll_s=5)
        serving = asyncio.create_task(worker.run())
        following: asyncio.Task[None] | None = None
        try:
            started = await _step(
                "start the execution",
                api(agent, "POST", f"/v1/workflows/{WORKFLOW_ID}/executions",
                    {"inputs": {"release": "v2.4.0"}}),
            )  # fmt: skip
            eid = started["execution_id"]
            echo(f"execution {eid} started")
            following = asyncio.create_task(follow_live_tokens(agent, eid, live))
            view = await _watch(
                agent, person, approver, eid, progress, deadline, serving, worker.taken
            )
        finally:
            worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 10)
            if following is not None:
                following.cancel()
                with contextlib.suppress(BaseException):
                    await following
        if view["status"] != "completed":
            raise DemoFailed(f"the workflow demo's execution did not complete: {describe(view)}")

        async def costed() -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]] | None:
            # The holds settle and the costs reach the projections over the bus.
            listing = await api(agent, "GET", "/v1/budgets", params={"execution_id": eid})
            b = next(x for x in listing["budgets"] if x["budget_id"] == BUDGET_ID)
            costs = {}
            for step in view["steps"]:
                for attempt in range(1, step["attempt"] + 1):
                    rid = f"{eid}:{step['step_id']}:{attempt}"
                    got = await api(agent, "GET", "/v1/costs",
                                    params={"group_by": "model", "run_id": rid})  # fmt: skip
                    costs[rid] = got["rows"]
            # Each step's last attempt completed, so it recorded its call: wait for its cost.
            done = Decimal(b["reserved_usd"]) == 0 and all(
                costs[s["run_id"]]
                and all(r["priced_steps"] == r["steps"] for r in costs[s["run_id"]])
                for s in view["steps"]
            )
            return (b, costs) if done else None

        b, costs = await _until("the execution's costs to be settled and projected", costed,
                                deadline + 30, lambda: describe(view))  # fmt: skip
        return WorkflowOutcome(
            execution_id=eid,
            execution=view,
            approver=f"user:{people['approver'].user_id}",
            budget=b,
            costs=costs,
            live_updates=live.updates,
        )


async def _step(what: str, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except ApiError as exc:
        raise DemoFailed(f"the workflow demo could not {what}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise DemoFailed(f"the workflow demo could not {what}: {type(exc).__name__}") from exc


async def _watch(
    agent: httpx.AsyncClient,
    person: httpx.AsyncClient,
    approver_token: str,
    eid: str,
    progress: Progress,
    deadline: float,
    serving: asyncio.Task[None],
    taken: Sequence[str],
) -> dict[str, Any]:
    """Print the execution's progress and approve its gated step, until it ends."""
    last: dict[str, Any] = {}
    approved: set[str] = set()

    async def ended() -> dict[str, Any] | None:
        if serving.done():
            raise DemoFailed(f"the example worker stopped: {serving.exception()!r}")
        view = await api(agent, "GET", f"/v1/executions/{eid}")
        last.clear()
        last.update(view)
        progress.execution(view)
        listing = await api(agent, "GET", "/v1/budgets", params={"execution_id": eid})
        progress.budget(listing)
        for step in view["steps"]:
            pending = (step.get("approval") or {}).get("pending")
            if pending and step["step_id"] not in approved:
                approved.add(step["step_id"])
                await _approve(person, approver_token, eid, step["step_id"], progress)
        return view if view["status"] in TERMINAL else None

    def state() -> str:
        return f"{describe(last)}; the example worker took {len(taken)} attempt(s)"

    view: dict[str, Any] = await _until("the execution to end", ended, deadline, state)
    progress.say(f"execution {eid} {view['status']}")
    return view


async def _approve(
    person: httpx.AsyncClient, token: str, eid: str, step_id: str, progress: Progress
) -> None:
    """Approve ``step_id`` as the approver, after a look at the approval queue."""
    queue = await api(person, "GET", "/v1/approvals", auth=token)
    mine = [a for a in queue["approvals"] if a["execution_id"] == eid and a["step_id"] == step_id]
    for a in mine:
        progress.say(
            f"{step_id:<17} in the approval queue for {a['age_s']:.1f} s, "
            f"{a['sla_left_s']:.0f} s of its SLA left"
        )
    path = f"/v1/executions/{eid}/steps/{step_id}/approve"
    await _step(f"approve {step_id}", api(person, "POST", path, {"reason": APPROVAL_REASON},
                                          auth=token))  # fmt: skip
    progress.say(f"{step_id:<17} approval sent: {APPROVAL_REASON!r}")


def _shape(steps: Sequence[Mapping[str, Any]]) -> str:
    return " → ".join(" ∥ ".join(s["id"] for s in level) for level in levels(steps))


def levels(steps: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The steps by depth in the DAG: those with no dependency first, then each step one level
    below its deepest dependency (so a level's steps may run in parallel)."""
    depth: dict[str, int] = {}
    ordered = list(steps)
    key = "id" if ordered and "id" in ordered[0] else "step_id"
    pending = list(ordered)
    while pending:
        rest = []
        for s in pending:
            deps = s.get("depends_on", [])
            if all(d in depth for d in deps):
                depth[s[key]] = 1 + max((depth[d] for d in deps), default=-1)
            else:
                rest.append(s)
        if len(rest) == len(pending):
            raise ValueError("the steps' dependencies do not form a DAG")
        pending = rest
    out: list[list[Mapping[str, Any]]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for s in ordered:
        out[depth[s[key]]].append(s)
    return out


# --- the event log and the summary -----------------------------------------------------------


async def logged_events(pool: AsyncConnectionPool, tenant_id: str, eid: str) -> list[EventEnvelope]:
    """The approvals of execution ``eid`` and its budget window's alerts, from the event store."""
    store = EventStore(pool)
    execution = await store.read_stream(stream_id_for(tenant_id, "execution", eid))
    budget = await store.read_stream(stream_id_for(tenant_id, "budget", BUDGET_ID))
    return [e for e in execution if e.event_type == "execution.step_approved"] + [
        e
        for e in budget
        if e.event_type == "budget.threshold_crossed" and e.payload.get("window_key") == eid
    ]


def summary(outcome: WorkflowOutcome, base_url: str, api_key: str) -> str:
    """The readable end of the workflow demo: the DAG, the cost, the approval and the alert."""
    view, eid = outcome.execution, outcome.execution_id
    lines = ["", f"Execution {eid} of {view['workflow_id']} v{view['workflow_version']}: "
             f"{view['status']}", ""]  # fmt: skip
    lines.append("DAG (each level's steps run in parallel):")
    for depth, level in enumerate(levels(view["steps"]), start=1):
        for i, s in enumerate(level):
            took = f"{s['duration_ms'] / 1000:.2f} s" if s.get("duration_ms") is not None else "-"
            after = f"after {', '.join(s['depends_on'])}" if s["depends_on"] else "first"
            approvers = (s.get("approval") or {}).get("approvers") or []
            gate = f"  approved by {', '.join(approvers)}" if approvers else ""
            lines.append(
                f"  {(str(depth) if i == 0 else ''):>2}  {s['step_id']:<17} {s['state']:<10} "
                f"attempt {s['attempt']}  {took:>7}  {s['agent_id']:<10} {s['risk_tier']:<12} "
                f"{after}{gate}"
            )
    by_agent, by_model = cost_by_agent_and_model(view, outcome.costs)
    lines += ["", f"{'cost by agent':<20} {'steps':>5} {'tokens':>8} {'USD':>12}"]
    lines += [
        f"  {k:<18} {v['steps']:>5} {v['tokens']:>8,} {v['usd']:>12.6f}"
        for k, v in by_agent.items()
    ]
    lines += [f"{'cost by model':<20} {'steps':>5} {'tokens':>8} {'USD':>12}"]
    lines += [
        f"  {k:<18} {v['steps']:>5} {v['tokens']:>8,} {v['usd']:>12.6f}"
        for k, v in by_model.items()
    ]
    total = sum((v["usd"] for v in by_agent.values()), Decimal(0))
    b = outcome.budget
    lines += [
        f"  {'total':<18} {'':>5} {'':>8} {total:>12.6f}",
        "",
        f"Budget {b['budget_id']} for this execution: spent ${b['spent_usd']} of "
        f"${b['cap_usd']}, reserved ${b['reserved_usd']}, alerted at {b['alerted_pct']} %",
        "",
        "In the event log:",
    ]
    for e in outcome.log:
        p = e.payload
        if e.event_type == "execution.step_approved":
            what = f"{p['step_id']} approved by {p['approver']} ({p['role']}): {p['reason']!r}"
        else:
            what = (f"{p['budget_id']} crossed {p['threshold_pct']} % of ${p['cap_usd']} "
                    f"(spent ${p['spent_usd']}, reserved ${p['reserved_usd']})")  # fmt: skip
        lines.append(f"  #{e.position} {e.stream_id} v{e.stream_version} {e.event_type}: {what}")
    auth = f"-H 'Authorization: Bearer {api_key}'"
    lines += [
        "",
        "Look around:",
        f"  curl {auth} {base_url}/v1/executions/{eid}",
        f"  curl {auth} '{base_url}/v1/budgets?execution_id={eid}'",
        f"  curl {auth} {base_url}/v1/workflows/{WORKFLOW_ID}",
        f"  curl {auth} '{base_url}/v1/costs?group_by=model'",
        "  Run the example worker yourself: MC_API_KEY=... python -m "
        f"services.gateway.example_worker --base-url {base_url}",
        "",
    ]
    return "\n".join(lines)


def cost_by_agent_and_model(
    view: Mapping[str, Any], costs: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The execution's cost summed by agent and by model, from each attempt's cost rows."""
    agent_of = {s["step_id"]: s["agent_id"] for s in view["steps"]}
    by_agent: dict[str, dict[str, Any]] = {}
    by_model: dict[str, dict[str, Any]] = {}
    for run_id, rows in costs.items():
        agent = agent_of[run_id.rsplit(":", 2)[1]]
        for r in rows:
            usd = Decimal(str(r["total_cost_usd"] or 0))
            tokens = int(r["input_tokens"]) + int(r["output_tokens"])
            for table, key in ((by_agent, agent), (by_model, str(r["key"]))):
                entry = table.setdefault(key, {"steps": 0, "tokens": 0, "usd": Decimal(0)})
                entry["steps"] += int(r["steps"])
                entry["tokens"] += tokens
                entry["usd"] += usd
    return dict(sorted(by_agent.items())), dict(sorted(by_model.items()))
