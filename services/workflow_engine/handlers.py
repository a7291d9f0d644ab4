"""The workflow-engine's command handlers: parse, execute on the run repository, reply.

Loading, caching, optimistic concurrency and retries are the application layer's
(:class:`~libs.eventbus.repository.Repository`); the rules are the run aggregate's
(:mod:`services.workflow_engine.domain`). A batch of steps of many runs is decided run by run and
appended in one transaction, all or none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    fold_with,
)
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork, join
from services.workflow_engine.definitions import (
    AGENT_CATEGORY,
    CATALOGUE,
    WORKFLOW_CATEGORY,
    Catalogue,
    RegisterAgent,
    SaveDefinition,
    WorkflowDocument,
    decide_agent,
    decide_definition,
    diff_documents,
    empty_catalogue,
    evolve_catalogue,
    summary,
)
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


def caller_meta(meta: RequestMeta) -> EventMeta:
    """Catalogue changes are acted by the caller the gateway names (a user or an API key)."""
    return EventMeta(
        correlation_id=meta.correlation_id,
        actor=meta.actor or SERVICE_ACTOR,
        trace_context=meta.trace_context,
    )


def _catalogue_streams(first: str, second: str) -> Any:
    def streams(tenant_id: str, entity_id: str) -> tuple[str, ...]:
        return (
            stream_id_for(tenant_id, first, entity_id),
            stream_id_for(tenant_id, second, entity_id),
        )

    return streams


WORKFLOWS = Aggregate[Catalogue](
    category=WORKFLOW_CATEGORY,
    initial=empty_catalogue,
    fold=fold_with(evolve_catalogue),
    streams=_catalogue_streams(WORKFLOW_CATEGORY, AGENT_CATEGORY),
)
"""A tenant's catalogue seen from its definitions stream (saves append there)."""

AGENTS = Aggregate[Catalogue](
    category=AGENT_CATEGORY,
    initial=empty_catalogue,
    fold=fold_with(evolve_catalogue),
    streams=_catalogue_streams(AGENT_CATEGORY, WORKFLOW_CATEGORY),
)
"""The same catalogue seen from its agents stream (registrations append there)."""


class DefinitionHandlers:
    """Commands and queries of workflow definitions and the agent catalogue."""

    def __init__(self, store: Store, *, max_retries: int = 3):
        self.workflows = Repository(store, WORKFLOWS, cache_size=1_000, max_retries=max_retries)
        self.agents = Repository(store, AGENTS, cache_size=1_000, max_retries=max_retries)

    async def save(
        self,
        tenant_id: str,
        document: WorkflowDocument,
        base_version: int | None,
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """Validate and save ``document`` as its workflow's next version.

        ``created`` is False when the document equals the newest version (nothing was saved).
        """
        cmd = SaveDefinition(document=document, base_version=base_version)
        state, stored = await self.workflows.execute(
            tenant_id, CATALOGUE, partial(decide_definition, command=cmd), caller_meta(meta)
        )
        newest = state.version(document.name)
        return {
            "workflow_id": document.name,
            "version": newest.version,
            "document_hash": newest.document_hash,
            "created": bool(stored),
        }

    async def register_agent(
        self, tenant_id: str, agent_id: str, description: str, meta: RequestMeta
    ) -> dict[str, Any]:
        """Add ``agent_id`` to the tenant's catalogue (idempotent)."""
        cmd = RegisterAgent(agent_id=agent_id, description=description)
        _, stored = await self.agents.execute(
            tenant_id, CATALOGUE, partial(decide_agent, command=cmd), caller_meta(meta)
        )
        return {"agent_id": agent_id, "registered": bool(stored)}

    async def catalogue(self, tenant_id: str) -> Catalogue:
        """The tenant's catalogue, caught up with the store."""
        return await self.workflows.load(tenant_id, CATALOGUE)

    async def list_workflows(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every workflow of the tenant, newest version of each, by name."""
        cat = await self.catalogue(tenant_id)
        return [summary(name, versions) for name, versions in sorted(cat.workflows.items())]

    async def list_agents(self, tenant_id: str) -> list[dict[str, Any]]:
        """The tenant's registered agents, by id."""
        cat = await self.catalogue(tenant_id)
        return [{"agent_id": a, "description": d} for a, d in sorted(cat.agents.items())]

    async def get(self, tenant_id: str, workflow_id: str, version: int | None) -> dict[str, Any]:
        """One version of a workflow (the newest by default), with every version's number."""
        cat = await self.catalogue(tenant_id)
        found = cat.version(workflow_id, version)
        return {
            "workflow_id": workflow_id,
            "version": found.version,
            "versions": [v.version for v in cat.versions(workflow_id)],
            "document_hash": found.document_hash,
            "document": found.document.content(),
        }

    async def diff(
        self, tenant_id: str, workflow_id: str, from_version: int, to_version: int | None
    ) -> dict[str, Any]:
        """What changed from ``from_version`` to ``to_version`` (default: the newest)."""
        cat = await self.catalogue(tenant_id)
        before = cat.version(workflow_id, from_version)
        after = cat.version(workflow_id, to_version)
        return {
            "workflow_id": workflow_id,
            "from_version": before.version,
            "to_version": after.version,
            **diff_documents(before.document, after.document),
        }


class WorkflowHandlers:
    """Command and query handlers of the run aggregate."""

    def __init__(self, store: Store, *, cache_size: int = 10_000, max_retries: int = 3):
        self.store = store
        self.runs = Repository(store, RUN, cache_size=cache_size, max_retries=max_retries)
        self.after_finish: Callable[[EventEnvelope], Awaitable[None]] | None = None
        """Called with a run's end once it is committed (the engine moves the execution of a
        workflow step's attempt at once from it; the consumer of run ends stays the
        guarantee, so a failure here is only logged)."""

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
        if stored and self.after_finish is not None:
            try:
                await self.after_finish(stored[-1])
            except Exception as exc:  # the run has ended all the same; the consumer moves on
                log.warning("workflow.after_finish_failed", run_id=run_id, error=repr(exc))
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
