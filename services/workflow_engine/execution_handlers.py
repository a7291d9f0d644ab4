"""The execution process manager's handlers: start, react to runs ending, tick, abort, dispatch.

Every change to an execution is one transaction that appends the execution's events, starts the
governed run of each attempt it dispatches, ends the runs of attempts it gives up on, and
updates the engine's index row (``workflow.executions``: status and next wake-up). So whatever
moment the engine dies at, the store and the index agree, and a restarted engine resumes from
them:

* a run that ended while the engine was down is still in its durable consumer;
* a deadline or retry that fell due meanwhile is found by the ticker in the index;
* a dispatch whose work item was not yet published is still in the dispatch consumer, and
  publishing it again is a no-op: the work item's ``Nats-Msg-Id`` is the attempt's run id, and
  ``MC_WORK`` drops duplicates within an hour.

No attempt is dispatched twice: a dispatch is an event appended under the execution stream's
expected version, so two engines (or a retried command) cannot both append it.

Budgets are reserved in the same transaction (see :mod:`budget_handlers`): each decision is
tried in a savepoint, its dispatched steps' estimates reserved; when a budget refuses one, the
savepoint is rolled back and the decision taken again with that step refused, which fails the
execution naming the budget. The holds of attempts that ended are released there too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, Literal

import orjson
import structlog
from nats.js import JetStreamContext

from libs.contracts.envelope import EventEnvelope, new_uuid7, utcnow
from libs.contracts.events import (
    ExecutionAborted,
    ExecutionBudgetExceeded,
    ExecutionCompleted,
    ExecutionFailed,
    RunCompleted,
    RunStoppedByPolicy,
    StepAttemptBlocked,
    StepAttemptCompleted,
    StepAttemptFailed,
    StepDispatched,
    StepStopped,
)
from libs.contracts.limits import RUN_ID_PATTERN
from libs.contracts.registry import decode
from libs.contracts.subjects import work_subject
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.repository import Aggregate, EventMeta, Repository, Store, fold_with
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork, begin, join
from services.workflow_engine.approvals import (
    APPROVAL_POLICY_CATEGORY,
    CURRENT,
    ApprovalPolicy,
    ApprovalRules,
    decide_policy,
    empty_policy,
    evolve_policy,
)
from services.workflow_engine.budget_handlers import BudgetHandlers, BudgetRefused
from services.workflow_engine.budgets import Budget, BudgetRefusal
from services.workflow_engine.domain import FinishRun, StartRun
from services.workflow_engine.domain import decide as decide_run
from services.workflow_engine.executions import (
    EXECUTION_CATEGORY,
    Abort,
    Approve,
    AttemptEnded,
    Command,
    Execution,
    Reject,
    StartExecution,
    StopStep,
    Tick,
    decide,
    empty_execution,
    evolve,
    parse_attempt_run_id,
    running_attempts,
    wake_at,
)
from services.workflow_engine.handlers import DefinitionHandlers, WorkflowHandlers, caller_meta

log = structlog.get_logger("workflow_engine.executions")

ENGINE_ACTOR = "service:workflow-engine"


EXECUTION = Aggregate[Execution](
    category=EXECUTION_CATEGORY, initial=empty_execution, fold=fold_with(evolve)
)
"""The execution aggregate: ``<tenant>/execution/<execution_id>``."""

APPROVAL_POLICY = Aggregate[ApprovalPolicy](
    category=APPROVAL_POLICY_CATEGORY, initial=empty_policy, fold=fold_with(evolve_policy)
)
"""A tenant's approval rules: ``<tenant>/approval_policy/current``."""


def work_item(env: EventEnvelope, event: StepDispatched) -> bytes:
    """What a worker receives for one dispatched attempt."""
    return orjson.dumps(
        {
            "tenant_id": env.tenant_id,
            "execution_id": event.execution_id,
            "workflow_id": event.workflow_id,
            "step_id": event.step_id,
            "attempt": event.attempt,
            "run_id": event.run_id,
            "agent_id": event.agent_id,
            "inputs": event.inputs,
            "risk_tier": event.risk_tier,
            "deadline_at": event.deadline_at.isoformat(),
            "correlation_id": env.correlation_id,
        }
    )


MAX_CURSOR = 300
"""Far above an encoded cursor (a timestamp and an execution id)."""


@dataclass(frozen=True)
class ExecutionQuery:
    """Which executions a listing shows: filters, and where the page starts."""

    status: str | None = None
    workflow_id: str | None = None
    started_after: datetime | None = None
    """Started at or after this instant."""
    started_before: datetime | None = None
    """Started before this instant."""
    after: tuple[datetime, str] | None = None
    """The last execution of the previous page (``started_at``, ``execution_id``)."""
    limit: int = 100


def encode_cursor(started_at: datetime, execution_id: str) -> str:
    """An opaque cursor that resumes a listing after this execution."""
    raw = f"{started_at.isoformat()}|{execution_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The execution a cursor resumes after; a cursor this code did not make is a 422."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, execution_id = raw.split("|", 1)
        started_at = datetime.fromisoformat(at)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidInput("cursor is not one a listing of executions returned") from None
    if started_at.tzinfo is None or not re.fullmatch(RUN_ID_PATTERN, execution_id):
        raise InvalidInput("cursor is not one a listing of executions returned")
    return started_at, execution_id


class ExecutionHandlers:
    """Commands, queries and reactions of workflow executions."""

    def __init__(
        self,
        store: Store,
        runs: WorkflowHandlers,
        definitions: DefinitionHandlers,
        budgets: BudgetHandlers | None = None,
        *,
        max_retries: int = 3,
    ) -> None:
        self.store = store
        self.runs = runs.runs
        self.definitions = definitions
        self.budgets = budgets or BudgetHandlers(store)
        self.executions = Repository(store, EXECUTION, cache_size=10_000, max_retries=max_retries)
        self.policies = Repository(
            store, APPROVAL_POLICY, cache_size=1_000, max_retries=max_retries
        )
        self._moved: OrderedDict[str, asyncio.Future[bool]] = OrderedDict()
        """Run ends this process applied at once, by event id: True once that committed."""
        self._sent: OrderedDict[str, None] = OrderedDict()
        """Dispatches whose work items this process published at once, by event id."""

    # --- the one path every change takes -----------------------------------------------------

    async def _apply(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        execution_id: str,
        command: Command,
        meta: EventMeta,
    ) -> tuple[Execution, list[EventEnvelope]]:
        refused: dict[str, BudgetRefusal] = {}
        while True:
            try:
                async with uow.savepoint():
                    return await self._apply_once(
                        uow, tenant_id, execution_id, command, meta, refused
                    )
            except BudgetRefused as exc:
                step_id = exc.refusal.step_id
                if step_id is None or step_id in refused:  # pragma: no cover - cannot repeat
                    raise
                refused[step_id] = exc.refusal

    async def _apply_once(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        execution_id: str,
        command: Command,
        meta: EventMeta,
        refused: dict[str, BudgetRefusal],
    ) -> tuple[Execution, list[EventEnvelope]]:
        state, stored = await self.executions.execute(
            tenant_id, execution_id, partial(decide, command=command, refused=refused), meta,
            uow=uow,
        )  # fmt: skip
        if not stored:
            return state, stored
        events = [decode(e) for e in stored]
        run_meta = EventMeta(
            correlation_id=meta.correlation_id,
            actor=ENGINE_ACTOR,
            trace_context=meta.trace_context,
        )
        for event in events:
            if isinstance(event, StepDispatched):
                start = StartRun(
                    run_id=event.run_id,
                    agent_id=event.agent_id,
                    labels={
                        "execution_id": event.execution_id,
                        "workflow_id": event.workflow_id,
                        "step_id": event.step_id,
                        "attempt": str(event.attempt),
                    },
                )
                await self.runs.execute(
                    tenant_id, event.run_id, partial(decide_run, command=start), run_meta, uow=uow
                )
        for event in events:
            if isinstance(event, StepAttemptFailed | StepStopped):
                # A timed-out or stopped attempt's run is ended, so its worker cannot go on.
                await self._end_run(uow, tenant_id, event.run_id, event.reason, run_meta)
        ended = [
            e.run_id
            for e in events
            if isinstance(
                e, StepAttemptCompleted | StepAttemptFailed | StepAttemptBlocked | StepStopped
            )
        ]
        if any(isinstance(e, ExecutionAborted | ExecutionFailed | ExecutionBudgetExceeded)
               for e in events):  # fmt: skip
            # Ending the runs of attempts still out is the cancellation: admission refuses any
            # further step of an ended run, so the agent cannot carry on.
            reason = state.reason or "the execution ended"
            for _, run_id in running_attempts(state):
                await self._end_run(uow, tenant_id, run_id, reason, run_meta)
                ended.append(run_id)
        if any(isinstance(e, ExecutionCompleted) for e in events):
            log.info("execution.completed", execution_id=execution_id)
        await self._index(uow, state)
        # Last before the commit: a reservation holds its windows' row locks until then.
        await self._budget(uow, tenant_id, state, events, ended, run_meta)
        return state, stored

    async def _budget(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        state: Execution,
        events: list[Any],
        ended: list[str],
        meta: EventMeta,
    ) -> None:
        """Reserve the dispatched attempts' estimates; release the ended attempts' holds."""
        if uow.conn is None:  # the in-memory twin has no tables
            return
        dispatched = [
            (e, state.spec(e.step_id).estimate.cost_usd)
            for e in events
            if isinstance(e, StepDispatched)
        ]
        if not dispatched and not ended:
            return
        # How many steps each ended attempt recorded: its hold waits for that many costs.
        recorded: dict[str, int] = {}
        for run_id in ended:
            run = await self.runs.load(tenant_id, run_id, uow=uow)
            recorded[run_id] = len(run.steps)
        await self.budgets.reserve(
            uow, tenant_id, state.workflow_id, state.execution_id, dispatched, recorded, meta
        )

    async def _end_run(
        self, uow: UnitOfWork, tenant_id: str, run_id: str, reason: str, meta: EventMeta
    ) -> None:
        finish = FinishRun(run_id=run_id, status="failed", reason=reason)
        with contextlib.suppress(Conflict):  # it ended on its own meanwhile
            await self.runs.execute(
                tenant_id, run_id, partial(decide_run, command=finish), meta, uow=uow
            )

    async def _index(self, uow: UnitOfWork, state: Execution) -> None:
        conn = uow.conn
        if conn is None:  # the in-memory twin has no tables
            return
        terminal = state.status in ("completed", "failed", "aborted")
        await conn.execute(
            "INSERT INTO workflow.executions (tenant_id, execution_id, workflow_id,"
            " workflow_version, status, started_at, finished_at, wake_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, execution_id) DO UPDATE SET status = EXCLUDED.status,"
            " finished_at = EXCLUDED.finished_at, wake_at = EXCLUDED.wake_at",
            (
                state.tenant_id,
                state.execution_id,
                state.workflow_id,
                state.workflow_version,
                state.status,
                state.started_at,
                state.finished_at if terminal else None,
                wake_at(state),
            ),
        )
        # Only an execution a step of which asked for approval has rows in the approval queue:
        # the others (most) skip two statements on every step transition.
        if not any(r.approval_required for r in state.steps.values()):
            return
        await conn.execute(
            "DELETE FROM workflow.approval_queue WHERE tenant_id = %s AND execution_id = %s",
            (state.tenant_id, state.execution_id),
        )
        for step_id, run in state.steps.items():
            if terminal or not run.awaiting_approval:
                continue
            await conn.execute(
                "INSERT INTO workflow.approval_queue (tenant_id, execution_id, step_id,"
                " workflow_id, risk_tier, required, approvals, role, requested_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    state.tenant_id, state.execution_id, step_id, state.workflow_id,
                    state.spec(step_id).risk_tier, run.approval_required, len(run.approvers),
                    run.approval_role, run.approval_requested_at, run.approval_expires_at,
                ),
            )  # fmt: skip

    # --- commands ------------------------------------------------------------------------------

    async def start(
        self,
        tenant_id: str,
        workflow_id: str,
        version: int | None,
        inputs: Mapping[str, Any],
        meta: RequestMeta,
        budget_usd: Decimal | None = None,
    ) -> dict[str, Any]:
        """Start an execution of a workflow version (the newest by default), with a budget of
        its own when ``budget_usd`` is given.

        An execution whose whole estimate exceeds a cap that applies to it is halted before its
        first step (``execution.budget_exceeded``).
        """
        catalogue = await self.definitions.catalogue(tenant_id)
        found = catalogue.version(workflow_id, version)
        policy = await self.policies.load(tenant_id, CURRENT)
        execution_id = str(new_uuid7())
        now = utcnow()
        event_meta = caller_meta(meta)
        async with self._unit() as uow:
            if budget_usd is not None:
                own = Budget.of("execution", execution_id, "execution", budget_usd)
                await self.budgets.set_budget(uow, tenant_id, own, event_meta)
            halt = await self.budgets.check_start(uow, tenant_id, execution_id, found.document, now)
            cmd = StartExecution(
                document=found.document,
                workflow_version=found.version,
                document_hash=found.document_hash,
                inputs=dict(inputs),
                now=now,
                approvals=policy.rules,
                halt=halt,
            )
            state, _ = await self._apply(uow, tenant_id, execution_id, cmd, event_meta)
        return state.to_dict()

    async def abort(
        self, tenant_id: str, execution_id: str, reason: str, meta: RequestMeta
    ) -> dict[str, Any]:
        """Abort a running execution."""
        await self._require(tenant_id, execution_id)
        async with self._unit() as uow:
            state, _ = await self._apply(
                uow, tenant_id, execution_id, Abort(reason=reason, now=utcnow()), caller_meta(meta)
            )
        return state.to_dict()

    async def decide_approval(
        self,
        tenant_id: str,
        execution_id: str,
        step_id: str,
        *,
        approve: bool,
        approver: str,
        role: str,
        reason: str,
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """Approve or reject a step waiting for approval, as ``approver`` holding ``role``."""
        await self._require(tenant_id, execution_id)
        kind = Approve if approve else Reject
        cmd = kind(step_id=step_id, approver=approver, role=role, reason=reason, now=utcnow())
        actor = EventMeta(
            correlation_id=meta.correlation_id, actor=approver, trace_context=meta.trace_context
        )
        async with self._unit() as uow:
            state, _ = await self._apply(uow, tenant_id, execution_id, cmd, actor)
        return state.to_dict()

    async def stop_step(
        self, tenant_id: str, execution_id: str, cmd: StopStep, meta: EventMeta
    ) -> Execution:
        """Stop a running attempt a budget cannot take (nothing if it already ended)."""
        async with self._unit() as uow:
            state, _ = await self._apply(uow, tenant_id, execution_id, cmd, meta)
        return state

    async def set_approval_rules(
        self, tenant_id: str, rules: ApprovalRules, meta: RequestMeta
    ) -> dict[str, Any]:
        """Set the tenant's approval rules (executions started from now on follow them)."""
        state, _ = await self.policies.execute(
            tenant_id, CURRENT, partial(decide_policy, rules=rules), caller_meta(meta)
        )
        return {"version": state.version, "rules": state.rules.content()}

    async def approval_rules(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's approval rules (the defaults until it sets its own)."""
        state = await self.policies.load(tenant_id, CURRENT)
        return {"version": state.version, "rules": state.rules.content()}

    async def approval_queue(self, tenant_id: str, pool: Any) -> list[dict[str, Any]]:
        """Steps waiting for approval, oldest first, with their age and time left."""
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT execution_id, step_id, workflow_id, risk_tier, required, approvals, role,"
                " requested_at, expires_at,"
                " extract(epoch FROM now() - requested_at) AS age_s,"
                " extract(epoch FROM expires_at - now()) AS sla_left_s"
                " FROM workflow.approval_queue WHERE tenant_id = %s ORDER BY requested_at",
                (tenant_id,),
            )
            rows = await cur.fetchall()
        return [
            {
                **r,
                "requested_at": r["requested_at"].isoformat(),
                "expires_at": r["expires_at"].isoformat(),
                "age_s": round(float(r["age_s"]), 3),
                "sla_left_s": round(float(r["sla_left_s"]), 3),
            }
            for r in rows
        ]

    # --- queries -------------------------------------------------------------------------------

    async def _require(self, tenant_id: str, execution_id: str) -> Execution:
        state = await self.executions.load(tenant_id, execution_id)
        if not state.exists:
            raise NotFound(f"execution {execution_id} not found")
        return state

    async def get(self, tenant_id: str, execution_id: str) -> dict[str, Any]:
        """An execution with its DAG's step states."""
        return (await self._require(tenant_id, execution_id)).to_dict(utcnow())

    async def list_executions(
        self, tenant_id: str, query: ExecutionQuery, pool: Any
    ) -> dict[str, Any]:
        """One page of the tenant's executions, newest first, and the cursor of the next page
        (None on the last)."""
        after_at, after_id = query.after or (None, None)
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT execution_id, workflow_id, workflow_version, status, started_at,"
                " finished_at FROM workflow.executions WHERE tenant_id = %(tenant)s"
                " AND (%(status)s::text IS NULL OR status = %(status)s)"
                " AND (%(workflow)s::text IS NULL OR workflow_id = %(workflow)s)"
                " AND (%(since)s::timestamptz IS NULL OR started_at >= %(since)s)"
                " AND (%(until)s::timestamptz IS NULL OR started_at < %(until)s)"
                " AND (%(after_at)s::timestamptz IS NULL"
                "      OR (started_at, execution_id) < (%(after_at)s, %(after_id)s::text))"
                " ORDER BY started_at DESC, execution_id DESC LIMIT %(limit)s",
                {
                    "tenant": tenant_id, "status": query.status, "workflow": query.workflow_id,
                    "since": query.started_after, "until": query.started_before,
                    "after_at": after_at, "after_id": after_id, "limit": query.limit + 1,
                },
            )  # fmt: skip
            rows = await cur.fetchall()
        page = rows[: query.limit]
        more = len(rows) > query.limit
        return {
            "executions": [
                {
                    **r,
                    "started_at": r["started_at"].isoformat(),
                    "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
                }
                for r in page
            ],
            "next_cursor": (
                encode_cursor(page[-1]["started_at"], page[-1]["execution_id"]) if more else None
            ),
        }

    # --- reactions -----------------------------------------------------------------------------

    async def on_run_event(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: an attempt's run ended (others are ignored)."""
        ended = _attempt_end(env)
        if ended is None:
            return
        moved = self._moved.get(str(env.event_id))
        if moved is not None and await asyncio.shield(moved):
            return  # this process applied it at once, and that committed: nothing left to do
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the execution consumer needs the PostgreSQL event store")
        execution_id, cmd = ended
        await self._apply(
            join(self.store, conn), env.tenant_id, execution_id, cmd,
            EventMeta.caused_by(env, ENGINE_ACTOR),
        )  # fmt: skip

    async def on_run_finished(self, env: EventEnvelope) -> list[EventEnvelope]:
        """Move an attempt's execution on as soon as its run's end is committed; the
        dispatches it made (for the caller to put on the work queues at once).

        A worker finishes its attempt's run through this engine, so the engine need not wait
        for ``run.completed`` to travel through the relay and its consumer before deciding what
        comes next: it decides here, in a transaction of its own, with the same causation the
        consumer would give. The consumer still receives the event, finds the step no longer
        running and changes nothing; a dispatch is appended under the execution stream's
        expected version, so the two paths can never both dispatch. If the engine dies between
        the two transactions, the consumer is the path that moves the execution.
        """
        ended = _attempt_end(env)
        if ended is None:
            return []
        execution_id, cmd = ended
        # The consumer of run ends, handed the same event meanwhile, waits for this outcome
        # rather than racing it for the execution stream.
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        _remember(self._moved, str(env.event_id), done)
        try:
            async with self._unit() as uow:
                _, stored = await self._apply(
                    uow, env.tenant_id, execution_id, cmd, EventMeta.caused_by(env, ENGINE_ACTOR)
                )
        except BaseException:
            done.set_result(False)
            raise
        done.set_result(True)
        return [e for e in stored if e.event_type == "execution.step_dispatched"]

    def note_sent(self, dispatched: list[EventEnvelope]) -> None:
        """These dispatches' work items are on their queues (JetStream acknowledged them)."""
        for env in dispatched:
            _remember(self._sent, str(env.event_id), None)

    def sent_at_once(self, env: EventEnvelope) -> bool:
        """Whether this process already put this dispatch's work item on its queue."""
        return str(env.event_id) in self._sent

    async def tick(self, pool: Any, now: datetime | None = None, limit: int = 100) -> int:
        """Move every execution whose deadline or retry is due; the number moved."""
        now = now or utcnow()
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT tenant_id, execution_id FROM workflow.executions"
                " WHERE wake_at IS NOT NULL AND wake_at <= %s ORDER BY wake_at LIMIT %s",
                (now, limit),
            )
            due = await cur.fetchall()
        for row in due:
            tenant_id, execution_id = row["tenant_id"], row["execution_id"]
            meta = EventMeta(correlation_id=str(new_uuid7()), actor=ENGINE_ACTOR)
            async with self._unit() as uow:
                await self._apply(uow, tenant_id, execution_id, Tick(now=now), meta)
        return len(due)

    def _unit(self) -> Any:
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("executions need the PostgreSQL event store")
        return begin(self.store)


REMEMBERED = 10_000
"""How many recent run ends and dispatches the engine remembers handling at once."""


def _remember(seen: OrderedDict[str, Any], key: str, value: Any) -> None:
    seen[key] = value
    while len(seen) > REMEMBERED:
        seen.popitem(last=False)


def _attempt_end(env: EventEnvelope) -> tuple[str, AttemptEnded] | None:
    """The execution and command of an attempt's run ending (None for any other event)."""
    event = decode(env)
    outcome: Literal["completed", "failed", "stopped"]
    if isinstance(event, RunCompleted):
        run_id, outcome, reason = event.run_id, event.status, event.reason
    elif isinstance(event, RunStoppedByPolicy):
        run_id, outcome, reason = event.run_id, "stopped", event.reason
    else:
        return None
    parsed = parse_attempt_run_id(run_id)
    if parsed is None:
        return None
    return parsed[0], AttemptEnded(run_id=run_id, outcome=outcome, reason=reason, now=utcnow())


async def publish_work(js: JetStreamContext, env: EventEnvelope) -> None:
    """Hand a dispatched attempt to its agent's work queue (idempotent per attempt)."""
    event = decode(env)
    if not isinstance(event, StepDispatched):
        return
    await js.publish(
        work_subject(env.tenant_id, event.agent_id),
        work_item(env, event),
        headers={"Nats-Msg-Id": event.run_id, "Mc-Correlation-Id": env.correlation_id},
    )
