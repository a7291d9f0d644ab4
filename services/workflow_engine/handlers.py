"""The workflow-engine's command handlers: parse, execute on the run repository, reply.

Loading, caching, optimistic concurrency and retries are the application layer's
(:class:`~libs.eventbus.repository.Repository`); the rules are the run aggregate's
(:mod:`services.workflow_engine.domain`). A batch of steps of many runs is decided run by run and
appended in one transaction, all or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import structlog

from libs.contracts import stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import PolicyViolationDetected
from libs.contracts.registry import decode
from libs.domain.run import RUN_CATEGORY
from libs.errors import NotFound, PermanentError
from libs.eventbus.db import AsyncConn
from libs.eventbus.repository import (
    Aggregate,
    Decide,
    EventMeta,
    Recorded,
    Repository,
    Store,
)
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork, join
from services.workflow_engine.domain import (
    FinishRun,
    RecordStep,
    RecordSteps,
    RunState,
    StartRun,
    StopRunForViolation,
    decide,
    empty_run,
    fold,
)

log = structlog.get_logger("workflow_engine")

SERVICE_ACTOR = "service:workflow-engine"


def _fold(state: RunState, recorded: Sequence[Recorded]) -> RunState:
    return fold(state, [r.event for r in recorded])


# Admission's stream of decisions on a run; read (never written) so a recorded step can be
# checked against the admissions it was given.
DECISIONS_CATEGORY = "decisions"


def _run_streams(tenant_id: str, run_id: str) -> tuple[str, ...]:
    return (
        stream_id_for(tenant_id, RUN_CATEGORY, run_id),
        stream_id_for(tenant_id, DECISIONS_CATEGORY, run_id),
    )


RUN = Aggregate[RunState](
    category=RUN_CATEGORY, initial=empty_run, fold=_fold, streams=_run_streams
)
"""The run aggregate: ``<tenant>/run/<run_id>`` (appended to) and admission's decisions on it,
merged in store order and folded by the shared run fold.

The decisions tell which steps hold an allowed admission. Admission answers only after its
decision committed, so a step recorded after its answer always finds it here."""


def _request_meta(meta: RequestMeta, agent_id: str | None = None) -> EventMeta:
    """Events a request causes are acted by ``Mc-Actor`` or else by the run's agent."""

    def actor(state: RunState) -> str:
        return meta.actor_for(agent_id or state.agent_id)

    return EventMeta(
        correlation_id=meta.correlation_id, actor=actor, trace_context=meta.trace_context
    )


class WorkflowHandlers:
    """Command and query handlers of the run aggregate."""

    def __init__(self, store: Store, *, cache_size: int = 10_000, max_retries: int = 3):
        self.store = store
        self.runs = Repository(store, RUN, cache_size=cache_size, max_retries=max_retries)

    # --- commands --------------------------------------------------------------------------------

    async def start_run(
        self,
        tenant_id: str,
        run_id: str,
        agent_id: str,
        labels: Mapping[str, str],
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """Start a run; the reply carries the position of ``run.started``."""
        cmd = StartRun(run_id=run_id, agent_id=agent_id, labels=dict(labels))
        state, stored = await self.runs.execute(
            tenant_id, run_id, partial(decide, command=cmd), _request_meta(meta, agent_id)
        )
        return {"run_id": run_id, "status": state.status, "positions": [e.position for e in stored]}

    async def record_steps(
        self, tenant_id: str, items: Sequence[RecordStep], meta: RequestMeta
    ) -> dict[str, Any]:
        """Record steps of any number of runs in one transaction (all or none).

        ``positions[i]`` is the store position of ``items[i]``.
        """
        by_run: dict[str, list[RecordStep]] = {}
        for item in items:
            by_run.setdefault(item.run_id, []).append(item)
        commands: dict[str, Decide[RunState]] = {
            run_id: partial(decide, command=RecordSteps(run_id=run_id, steps=tuple(steps)))
            for run_id, steps in by_run.items()
        }
        out = await self.runs.execute_many(tenant_id, commands, _request_meta(meta))
        # Events of one run are stored in the order of its items; map them back to the request.
        stored_by_run: dict[str, list[EventEnvelope]] = {}
        for env in out.stored:
            stored_by_run.setdefault(str(env.payload["run_id"]), []).append(env)
        cursors = {run_id: iter(envs) for run_id, envs in stored_by_run.items()}
        positions = [next(cursors[item.run_id]).position for item in items]
        return {"recorded": len(out.stored), "positions": positions}

    async def finish_run(
        self,
        tenant_id: str,
        run_id: str,
        status: Literal["completed", "failed"],
        reason: str | None,
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """End a run as ``completed`` or ``failed``."""
        cmd = FinishRun(run_id=run_id, status=status, reason=reason)
        state, stored = await self.runs.execute(
            tenant_id, run_id, partial(decide, command=cmd), _request_meta(meta)
        )
        return {"run_id": run_id, "status": state.status, "positions": [e.position for e in stored]}

    # --- queries ---------------------------------------------------------------------------------

    async def get_run(self, tenant_id: str, run_id: str) -> RunState:
        """The run's current state (always caught up with the store: reads the newer versions).

        Raises :class:`~libs.errors.NotFound` when the tenant has no such run.
        """
        state = await self.runs.load(tenant_id, run_id)
        if not state.exists:
            raise NotFound(f"run {run_id} not found")
        return state

    # --- the violation consumer ------------------------------------------------------------------

    async def on_violation(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: stop the violating run in the consumer's transaction."""
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the violation consumer needs the PostgreSQL event store")
        await self.stop_for_violation(join(self.store, conn), env)

    async def stop_for_violation(self, uow: UnitOfWork, env: EventEnvelope) -> None:
        """Stop the run a ``policy.violation_detected`` names, in ``uow``."""
        event = decode(env)
        if not isinstance(event, PolicyViolationDetected):
            raise PermanentError(f"expected policy.violation_detected, got {env.event_type}")
        if event.enforcement != "enforce":
            # The tenant's policy only warns: the violation is on record, the run goes on.
            log.info(
                "workflow.violation_warned",
                run_id=event.run_id,
                step_index=event.step_index,
                policy_id=event.policy_id,
            )
            return
        cmd = StopRunForViolation(
            run_id=event.run_id,
            step_index=event.step_index,
            policy_id=event.policy_id,
            decision_id=event.decision_id,
            reason=event.message,
        )
        _, stored = await self.runs.execute(
            env.tenant_id,
            event.run_id,
            partial(decide, command=cmd),
            EventMeta.caused_by(env, SERVICE_ACTOR),
            uow=uow,
        )
        if not stored:
            log.info("workflow.violation_ignored", run_id=event.run_id)
            return
        log.info(
            "workflow.run_stopped_by_policy",
            run_id=event.run_id,
            step_index=event.step_index,
            policy_id=event.policy_id,
        )
