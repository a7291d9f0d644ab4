"""Audit queries over NATS request–reply (``mc.rpc.audit.<method>``).

Every method is scoped by the request's ``tenant_id`` (set by the gateway from the API key): each
query filters on it, so no answer ever holds another tenant's rows.

* ``runs``: ``status?`` (running, completed, failed, stopped_by_policy; ``live`` = running and
  ``completed`` = every finished run), ``agent_id?``, ``limit?`` (<= 500), ``offset?`` →
  ``{runs, limit, offset}``, each run with ``tokens_used``, ``cost_usd``, ``unpriced_steps``.
* ``run``: ``run_id`` → the run with ``incident_ids``.
* ``trace``: ``run_id`` → ``{run, steps, inflection_point}``; each step carries its admission
  ``decision`` and ``cost``; the denied step appears with status ``denied``.
* ``incidents``: ``status?`` (open, acknowledged, resolved), ``run_id?``, ``policy_id?``,
  ``limit?``, ``offset?`` → ``{incidents, limit, offset}``.
* ``incident``: ``incident_id`` → the incident.
* ``policies`` → ``{bundle_digest, activated_at, policies}`` with ``incident_count`` and
  ``open_incidents`` per policy.
* ``costs``: ``group_by`` (run, agent, model, workflow, day), ``run_id?`` →
  ``{group_by, rows, totals}``; each row with its token counts and cost per usage component,
  the provider-reported cost and how many steps' figures differ from ours.
* ``replay``: ``run_id``, ``at_position?``, ``at_version?`` or ``at_step?`` (not with either
  other) → ``{state, events_applied, inflection_point, at_position, at_version, at_step,
  events_total}``, folded from the event store; ``events_total`` is how many events the run's
  stream holds (the highest ``at_version``).
* ``export``: ``run_id``, ``format`` (json, csv) → ``{content_type, body}``.
* ``search``: ``run_id?``, ``agent_id?``, ``workflow_id?``, ``execution_id?``, ``policy_id?``,
  ``outcome?``, ``incident_id?``, ``actor?``, ``event_type?``, ``since?``, ``until?``, ``q?``
  (full text), ``limit?`` (<= 200), ``cursor?`` → ``{events, next_cursor, limit}``, the
  tenant's events newest first (see :mod:`services.audit_replay.domain.search`).
* ``replay_execution``: ``execution_id``, ``at_position?``, ``at_version?`` →
  ``{state, events_applied, inflection_point, at_position, at_version}``, the execution folded
  from its stream up to that point (the first failed, blocked, stopped or rejected step, an
  exceeded budget or the execution's failure is its inflection point).
* ``export_events``: ``subject_type`` (run, execution), ``subject_id`` → ``{content_type, body}``,
  the NDJSON export with hashes and checkpoint proof (:mod:`services.audit_replay.exports`).
* ``export_job_create``: ``subject_type``, ``subject_id``, ``requested_by`` → the job;
  ``export_job``: ``job_id`` → the job; ``export_jobs``: ``limit?`` → ``{jobs}``;
  ``export_job_part``: ``job_id``, ``seq`` → ``{seq, data, next}`` (a done job's file, a part at a
  time).
* ``rebuild`` → ``{events, rows, position, duration_s}``.
* ``lag`` → ``{head_position, projected_position, lag_events, lag_seconds, rebuilding}``.
* ``simulation_decisions``, ``step_costs``: what a policy simulation reads (see
  :mod:`services.audit_replay.simulation_reads`).
* ``analytics``: ``view``, ``days?`` → ``{view, days, columns, rows, truncated}``;
  ``statements`` → ``{statements}``; ``statement``: ``period`` (``YYYY-MM``) → the month's
  usage and chargeback lines by agent and model (see :mod:`services.audit_replay.insights`).

The console's listings and aggregates (:data:`CACHED_READS`) are answered from
:class:`~services.audit_replay.answers.AnswerCache` while the projections have not moved, and
identical requests arriving together share one computation; the aggregates
(:data:`RELAXED_READS`) may be up to ``MC_ANALYTICS_MAX_STALENESS_MS`` old (see
:mod:`services.audit_replay.answers`).

While a rebuild runs, every query that reads the projections (all but ``replay``, which reads the
event store, ``lag`` and ``rebuild``) answers ``unavailable`` ("projections are being rebuilt,
retry shortly") instead of partial lists or a false "not found" from half-built tables.

A run's ``cost_usd`` sums its priced steps only (``null`` when none is priced); steps that could
not be priced are counted in ``unpriced_steps``, never as zero cost. ``open_incidents`` counts the
incidents not resolved yet.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from libs.contracts.envelope import stream_id_for
from libs.errors import (
    InvalidInput,
    MissionControlError,
    NotFound,
    TransientError,
)
from libs.eventbus.rpc import RpcServer
from libs.eventbus.store import EventStore
from services.audit_replay import insights, simulation_reads
from services.audit_replay.answers import AnswerCache, answer_key
from services.audit_replay.clickhouse import TENANT, Clickhouse, tenant_filter
from services.audit_replay.domain import (
    ExecutionReplay,
    IncidentRow,
    ReplayState,
    RunRow,
    cost_summary,
    events_through_step,
    evolve_execution,
    evolve_replay,
    execution_replay_answer,
    incident_view,
    inflection_point,
    iso,
    replay_answer,
    run_stream,
    run_view,
    trace_csv,
    trace_steps,
)
from services.audit_replay.domain.search import page, parse_search, search_sql
from services.audit_replay.domain.views import COST_COMPONENTS, COST_TOKENS
from services.audit_replay.exports import (
    EXECUTION_CATEGORY,
    SUBJECT_TYPES,
    Checkpoints,
    ExportJobs,
    export_inline,
    plan_export,
)
from services.audit_replay.handlers import (
    LagMonitor,
    Projector,
    read_run_history,
    replay_limit,
)
from services.audit_replay.schema import DATABASE as DB

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
RUN_STATUSES = ("running", "completed", "failed", "stopped_by_policy")
INCIDENT_STATUSES = ("open", "acknowledged", "resolved")
GROUP_KEYS = {
    "run": "run_id",
    "agent": "agent_id",
    "model": "model",
    "workflow": "workflow_id",
    # The step of an execution (a step attempt's run's label); other runs' costs group as null.
    "step": "step_id",
    # Days in UTC, as ISO dates.
    "day": "toString(toDate(occurred_at))",
}
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Methods that do not read the projection tables, so a rebuild does not hold them up.
NOT_PROJECTION_READS = frozenset(
    {
        "replay",
        "replay_execution",
        "export_events",
        "export_job_create",
        "export_job",
        "export_jobs",
        "export_job_part",
        "rebuild",
        "lag",
    }
)
REBUILDING_MESSAGE = "projections are being rebuilt, retry shortly"
# The reads the console's panels repeat: kept by the answer cache, shared while computed.
CACHED_READS = frozenset(
    {"runs", "incidents", "policies", "costs", "analytics", "statements", "statement"}
)
# Of those, the aggregates over weeks of costs and decisions, which may be served a little stale
# (up to the cache's max_staleness) once the projections moved. The listings are not: a person
# who stops a run or acknowledges an incident expects the next listing to show it.
RELAXED_READS = frozenset({"costs", "analytics", "statements", "statement"})

# A cost counts as priced only when it carries an amount; anything else is "unpriced".
_PRICED = "(pricing_status = 'priced' AND total_cost_usd IS NOT NULL)"

Params = Mapping[str, Any]
# The tenant a shared policy bundle is activated for; its policies are visible to every tenant.
SYSTEM_TENANT = "system"


def _tenant(p: Params) -> str:
    t = p.get("tenant_id")
    if not isinstance(t, str) or not _TENANT_RE.fullmatch(t):
        raise InvalidInput("tenant_id is required and must be a valid tenant id")
    return t


def _text(p: Params, name: str, *, required: bool = False) -> str | None:
    v = p.get(name)
    if v is None:
        if required:
            raise InvalidInput(f"{name} is required")
        return None
    if not isinstance(v, str) or not v or len(v) > 300:
        raise InvalidInput(f"{name} must be a non-empty string of at most 300 characters")
    return v


def _int(
    p: Params, name: str, *, default: int | None, low: int, high: int | None = None
) -> int | None:
    v = p.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidInput(f"{name} must be an integer {bound}")
    return v


def _choice(
    p: Params, name: str, choices: tuple[str, ...], *, required: bool = False
) -> str | None:
    v = p.get(name)
    if v is None and not required:
        return None
    if v not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}")
    return str(v)


def _page(p: Params) -> tuple[int, int]:
    limit = _int(p, "limit", default=DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    offset = _int(p, "offset", default=0, low=0)
    return limit or DEFAULT_LIMIT, offset or 0


class AuditQueries:
    """The audit service's read side: ClickHouse for queries, the event store for replay."""

    def __init__(
        self,
        ch: Clickhouse,
        projector: Projector,
        store: EventStore,
        lag: LagMonitor,
        store_reads: Mapping[str, Callable[[Params], Awaitable[Any]]] | None = None,
        answers: AnswerCache[bytes] | None = None,
    ) -> None:
        self.ch = ch
        # The JSON of the console's reads' answers (None: every request computes its own).
        self.answers = answers
        # Further methods that read the event store, not the projections (the evidence
        # documents of services/audit_replay/evidence_queries.py).
        self.store_reads = dict(store_reads or {})
        self.projector = projector
        self.store = store
        self.lag_monitor = lag
        self.checkpoints = Checkpoints(store)
        self.exports = ExportJobs(store, self.checkpoints)

    def routes(self) -> dict[str, Callable[[Params], Awaitable[Any]]]:
        """Method name → handler."""
        return {
            "runs": self.runs,
            "run": self.run,
            "trace": self.trace,
            "incidents": self.incidents,
            "incident": self.incident,
            "policies": self.policies,
            "costs": self.costs,
            "replay": self.replay,
            "export": self.export,
            "search": self.search,
            "replay_execution": self.replay_execution,
            "export_events": self.export_events,
            "export_job_create": self.export_job_create,
            "export_job": self.export_job,
            "export_jobs": self.export_jobs,
            "export_job_part": self.export_job_part,
            "rebuild": self.rebuild,
            "lag": self.lag,
            "simulation_decisions": self.simulation_decisions,
            "step_costs": self.step_costs,
            "analytics": self.analytics,
            "statements": self.statements,
            "statement": self.statement,
            **self.store_reads,
        }

    def register(self, server: RpcServer) -> None:
        """Register every method on ``server``."""
        for method, fn in self.routes().items():
            if method in NOT_PROJECTION_READS or method in self.store_reads:
                server.route(method, _plain(fn))
            elif method in CACHED_READS and self.answers is not None:
                server.route(method, self._cached_read(method, fn, self.answers))
            else:
                server.route(method, self._projection_read(fn))

    def _projection_read(
        self, fn: Callable[[Params], Awaitable[Any]]
    ) -> Callable[[dict[str, Any], dict[str, str]], Awaitable[Any]]:
        """``fn`` refusing to answer while a rebuild runs, or if one began while it read.

        During a rebuild the tables are dropped and refilled, so an answer would be partial or a
        false "not found": the caller gets :class:`TransientError` and retries. A query that
        started just before a rebuild is caught by the rebuild counter having moved.
        """

        async def handler(payload: dict[str, Any], headers: dict[str, str]) -> Any:
            projector = self.projector
            if projector.rebuilding:
                raise TransientError(REBUILDING_MESSAGE)
            seen = projector.rebuilds_started
            try:
                result = await fn(payload)
            except MissionControlError as exc:
                if projector.rebuilding or projector.rebuilds_started != seen:
                    raise TransientError(REBUILDING_MESSAGE) from exc
                raise
            if projector.rebuilding or projector.rebuilds_started != seen:
                raise TransientError(REBUILDING_MESSAGE)
            return result

        return handler

    def _cached_read(
        self, method: str, fn: Callable[[Params], Awaitable[Any]], answers: AnswerCache[bytes]
    ) -> Callable[[dict[str, Any], dict[str, str]], Awaitable[Any]]:
        """:meth:`_projection_read` of ``fn`` through the answer cache.

        The answer is kept as its JSON (its exact size, nothing a caller could change) and
        handed to the bus as is. A rebuild refuses the request before the cache is asked, and an
        answer spoiled by a rebuild that began while it was computed is an error, never kept.
        """
        read = self._projection_read(fn)
        relaxed = method in RELAXED_READS

        async def handler(payload: dict[str, Any], headers: dict[str, str]) -> Any:
            if self.projector.rebuilding:
                raise TransientError(REBUILDING_MESSAGE)
            key = answer_key(_tenant(payload), method, payload)

            async def compute() -> bytes:
                return orjson.dumps(await read(payload, headers))

            return orjson.Fragment(await answers.get(key, compute, relaxed=relaxed))

        return handler

    # --- runs ------------------------------------------------------------------------------------

    async def runs(self, p: Params) -> dict[str, Any]:
        """Runs of the tenant, newest first, with tokens, cost and unpriced steps."""
        tenant = _tenant(p)
        status = _choice(p, "status", (*RUN_STATUSES, "live"))
        agent = _text(p, "agent_id")
        limit, offset = _page(p)
        where = [TENANT]
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status == "live":
            where.append("status = 'running'")
        elif status == "completed":
            where.append("status != 'running'")
        elif status is not None:
            where.append("status = {status:String}")
            params["status"] = status
        if agent is not None:
            where.append("agent_id = {agent:String}")
            params["agent"] = agent
        rows = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT * FROM {DB}.runs FINAL WHERE {' AND '.join(where)} "
            "ORDER BY started_at DESC, run_id LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
            params,
        )
        runs = [RunRow.from_row(r) for r in rows]
        totals = await self._totals(tenant, [r.run_id for r in runs])
        return {
            "runs": [run_view(r, **totals.get(r.run_id, _NO_TOTALS)) for r in runs],
            "limit": limit,
            "offset": offset,
        }

    async def _totals(self, tenant: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not run_ids:
            return {}
        scope, params = tenant_filter(tenant), {"ids": run_ids}
        tokens = await self.ch.select(
            scope,
            "SELECT run_id, sum(input_tokens + output_tokens) AS tokens "
            f"FROM {DB}.steps FINAL WHERE {TENANT} "
            "AND run_id IN {ids:Array(String)} GROUP BY run_id",
            params,
        )
        costs = await self.ch.select(
            scope,
            f"SELECT run_id, sumIf(total_cost_usd, {_PRICED}) AS priced_usd, "
            f"countIf({_PRICED}) AS priced, countIf(NOT {_PRICED}) AS unpriced "
            f"FROM {DB}.costs FINAL WHERE {TENANT} "
            "AND run_id IN {ids:Array(String)} GROUP BY run_id",
            params,
        )
        out: dict[str, dict[str, Any]] = {r: dict(_NO_TOTALS) for r in run_ids}
        for row in tokens:
            out[row["run_id"]]["tokens_used"] = int(row["tokens"])
        for row in costs:
            t = out[row["run_id"]]
            t["cost_usd"] = row["priced_usd"] if int(row["priced"]) else None
            t["unpriced_steps"] = int(row["unpriced"])
        return out

    async def search(self, p: Params) -> dict[str, Any]:
        """The tenant's events matching every filter given, newest first, a page at a time."""
        tenant = _tenant(p)
        query = parse_search(tenant, p)
        sql, params = search_sql(query, DB)
        return page(query, await self.ch.select(tenant_filter(tenant), sql, params))

    async def _run_row(self, tenant: str, run_id: str) -> RunRow:
        rows = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT * FROM {DB}.runs FINAL WHERE {TENANT} AND run_id = {{run:String}}",
            {"run": run_id},
        )
        if not rows:
            raise NotFound(f"run {run_id} not found")
        return RunRow.from_row(rows[0])

    async def _run_view(self, tenant: str, run: RunRow) -> dict[str, Any]:
        totals = await self._totals(tenant, [run.run_id])
        view = run_view(run, **totals[run.run_id])
        ids = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT incident_id FROM {DB}.incidents FINAL WHERE {TENANT} "
            "AND run_id = {run:String} ORDER BY incident_id",
            {"run": run.run_id},
        )
        view["incident_ids"] = [r["incident_id"] for r in ids]
        return view

    async def run(self, p: Params) -> dict[str, Any]:
        """One run, with its totals and its incidents' ids."""
        tenant = _tenant(p)
        run_id = _text(p, "run_id", required=True)
        assert run_id is not None
        return await self._run_view(tenant, await self._run_row(tenant, run_id))

    async def trace(self, p: Params) -> dict[str, Any]:
        """A run's steps in order with decisions and costs, and where it went wrong."""
        tenant = _tenant(p)
        run_id = _text(p, "run_id", required=True)
        assert run_id is not None
        return await self._trace(tenant, run_id)

    async def _trace(self, tenant: str, run_id: str) -> dict[str, Any]:
        run = await self._run_row(tenant, run_id)
        scope, params = tenant_filter(tenant), {"run": run_id}
        where = f"WHERE {TENANT} AND run_id = {{run:String}}"
        steps = await self.ch.select(
            scope, f"SELECT * FROM {DB}.steps FINAL {where} ORDER BY step_index", params
        )
        decisions = await self.ch.select(
            scope,
            f"SELECT * FROM {DB}.decisions FINAL {where} ORDER BY step_index, version",
            params,
        )
        costs = await self.ch.select(
            scope, f"SELECT * FROM {DB}.costs FINAL {where} ORDER BY step_index, version", params
        )
        inflection = inflection_point(run, decisions)
        return {
            "run": await self._run_view(tenant, run),
            "steps": trace_steps(steps, decisions, costs, inflection),
            "inflection_point": inflection,
        }

    # --- incidents and policies -----------------------------------------------------------------

    async def incidents(self, p: Params) -> dict[str, Any]:
        """Incidents of the tenant, newest first, optionally filtered."""
        tenant = _tenant(p)
        status = _choice(p, "status", INCIDENT_STATUSES)
        run_id = _text(p, "run_id")
        policy_id = _text(p, "policy_id")
        limit, offset = _page(p)
        where = [TENANT]
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for column, value in (("status", status), ("run_id", run_id), ("policy_id", policy_id)):
            if value is not None:
                where.append(f"{column} = {{{column}:String}}")
                params[column] = value
        rows = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT * FROM {DB}.incidents FINAL WHERE {' AND '.join(where)} "
            "ORDER BY opened_at DESC, incident_id LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
            params,
        )
        return {
            "incidents": [incident_view(IncidentRow.from_row(r)) for r in rows],
            "limit": limit,
            "offset": offset,
        }

    async def incident(self, p: Params) -> dict[str, Any]:
        """One incident."""
        tenant = _tenant(p)
        incident_id = _text(p, "incident_id", required=True)
        rows = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT * FROM {DB}.incidents FINAL WHERE {TENANT} AND incident_id = {{id:String}}",
            {"id": incident_id},
        )
        if not rows:
            raise NotFound(f"incident {incident_id} not found")
        return incident_view(IncidentRow.from_row(rows[0]))

    async def policies(self, p: Params) -> dict[str, Any]:
        """The active bundle's policies with this tenant's incident counts."""
        tenant = _tenant(p)
        # The bundle is the system tenant's, unless the tenant has one of its own.
        latest = await self.ch.select(
            tenant_filter(SYSTEM_TENANT, tenant),
            f"SELECT tenant_id, bundle_digest, activated_at FROM {DB}.policies FINAL "
            f"WHERE {TENANT} ORDER BY version DESC LIMIT 1",
        )
        if not latest:
            return {"bundle_digest": None, "activated_at": None, "policies": []}
        head = latest[0]
        rows = await self.ch.select(
            tenant_filter(head["tenant_id"]),
            f"SELECT * FROM {DB}.policies FINAL WHERE {TENANT} "
            "AND bundle_digest = {digest:String} ORDER BY policy_id",
            {"digest": head["bundle_digest"]},
        )
        counts = await self.ch.select(
            tenant_filter(tenant),
            "SELECT policy_id, count() AS n, countIf(status != 'resolved') AS n_open "
            f"FROM {DB}.incidents FINAL WHERE {TENANT} GROUP BY policy_id",
        )
        by_policy = {c["policy_id"]: c for c in counts}
        policies = []
        for r in rows:
            c = by_policy.get(r["policy_id"], {})
            policies.append(
                {
                    "policy_id": r["policy_id"],
                    "title": r["title"],
                    "severity": r["severity"],
                    "runbook_url": r["runbook_url"],
                    "description": r["description"],
                    "incident_count": int(c.get("n", 0)),
                    "open_incidents": int(c.get("n_open", 0)),
                }
            )
        return {
            "bundle_digest": head["bundle_digest"],
            "activated_at": iso(head["activated_at"]),
            "policies": policies,
        }

    # --- costs ----------------------------------------------------------------------------------

    async def costs(self, p: Params) -> dict[str, Any]:
        """Costs grouped by run, agent, model, workflow, day or step, with their usage
        components and totals (of every run, one run, or one execution's runs); unpriced steps
        counted apart (see :func:`cost_summary`)."""
        tenant = _tenant(p)
        group_by = _choice(p, "group_by", tuple(GROUP_KEYS), required=True)
        assert group_by is not None
        run_id = _text(p, "run_id")
        execution_id = _text(p, "execution_id")
        column = GROUP_KEYS[group_by]
        where = TENANT
        params: dict[str, Any] = {}
        if run_id is not None:
            where += " AND run_id = {run:String}"
            params["run"] = run_id
        # A cost names its run; the run's workflow, execution and step are in the runs
        # projection (its labels). One execution's costs are those of its attempts' runs.
        runs_where = TENANT
        if execution_id is not None:
            runs_where += " AND execution_id = {execution:String}"
            params["execution"] = execution_id
        join = (
            f"{'INNER' if execution_id is not None else 'LEFT'} JOIN (SELECT run_id, "
            f"workflow_id, step_id FROM {DB}.runs FINAL WHERE {runs_where}) AS w USING (run_id) "
            if group_by in ("workflow", "step") or execution_id is not None
            else ""
        )
        components = ", ".join(
            f"sumIf(ifNull({c}_cost_usd, 0), {_PRICED}) AS {c}_usd" for c in COST_COMPONENTS
        )
        rows = await self.ch.select(
            tenant_filter(tenant),
            f"SELECT {column} AS group_key, count() AS n_steps, countIf({_PRICED}) AS n_priced, "
            + "".join(f"sum({t}) AS {t}, " for t in COST_TOKENS)
            + f"sumIf(total_cost_usd, {_PRICED}) AS priced_usd, {components}, "
            "countIf(provider_cost_usd IS NOT NULL) AS n_reported, "
            "sumIf(provider_cost_usd, provider_cost_usd IS NOT NULL) AS provider_usd, "
            "countIf(cost_mismatch = 1) AS n_mismatch "
            f"FROM {DB}.costs FINAL {join}WHERE {where} GROUP BY group_key ORDER BY group_key",
            params,
        )
        groups, totals = cost_summary(rows)
        return {"group_by": group_by, "rows": groups, "totals": totals}

    # --- replay, export, operations -------------------------------------------------------------

    async def replay(self, p: Params) -> dict[str, Any]:
        """The run rebuilt from the event store, folded up to a position, run version or step,
        with how many events the run's stream holds."""
        tenant = _tenant(p)
        run_id = _text(p, "run_id", required=True)
        assert run_id is not None
        at_position = _int(p, "at_position", default=None, low=1)
        at_version = _int(p, "at_version", default=None, low=1)
        at_step = _int(p, "at_step", default=None, low=0)
        if at_step is not None and (at_position is not None or at_version is not None):
            other = "at_position" if at_position is not None else "at_version"
            raise InvalidInput(f"at_step and {other} both choose the point: give one of them")
        history = await read_run_history(
            self.store, tenant, run_id, at_position=at_position, at_version=at_version
        )
        if not history:
            raise NotFound(f"run {run_id} has no events at that point")
        if at_step is not None:
            # The step's last event is a store position: fold the history up to it.
            through = events_through_step(history, at_step)
            if through is None:
                raise InvalidInput(f"at_step {at_step} does not exist in run {run_id}")
            history = history[:through]
        state = ReplayState()
        for env in history:
            state = evolve_replay(state, env)
        stream = run_stream(tenant, run_id)
        counts = await self.store.stream_counts(tenant, [stream])
        return {**replay_answer(state), "events_total": counts.get(stream, 0)}

    async def export(self, p: Params) -> dict[str, Any]:
        """A run's trace as a JSON document or as CSV (one row per step)."""
        tenant = _tenant(p)
        run_id = _text(p, "run_id", required=True)
        fmt = _choice(p, "format", ("json", "csv"), required=True)
        assert run_id is not None
        trace = await self._trace(tenant, run_id)
        if fmt == "csv":
            return {"content_type": "text/csv; charset=utf-8", "body": trace_csv(trace)}
        return {
            "content_type": "application/json",
            "body": orjson.dumps(trace, option=orjson.OPT_INDENT_2).decode(),
        }

    async def replay_execution(self, p: Params) -> dict[str, Any]:
        """A workflow execution rebuilt from its stream, up to a position or stream version."""
        tenant = _tenant(p)
        execution_id = _text(p, "execution_id", required=True)
        assert execution_id is not None
        at_position = _int(p, "at_position", default=None, low=1)
        at_version = _int(p, "at_version", default=None, low=1)
        stream = stream_id_for(tenant, EXECUTION_CATEGORY, execution_id)
        limit = await replay_limit(
            self.store, stream, at_position, at_version, f"execution {execution_id}"
        )
        history = await self.store.read_history(tenant, [stream], up_to_position=limit)
        if not history:
            raise NotFound(f"execution {execution_id} has no events at that point")
        state = ExecutionReplay(execution_id=execution_id)
        for env in history:
            state = evolve_execution(state, env)
        return execution_replay_answer(state)

    def _subject(self, p: Params) -> tuple[str, str, str]:
        tenant = _tenant(p)
        kind = _choice(p, "subject_type", SUBJECT_TYPES, required=True)
        subject_id = _text(p, "subject_id", required=True)
        assert kind is not None
        assert subject_id is not None
        return tenant, kind, subject_id

    async def export_events(self, p: Params) -> dict[str, Any]:
        """A run's or an execution's events with hashes and checkpoint proof, as NDJSON."""
        tenant, kind, subject_id = self._subject(p)
        plan = await plan_export(self.store, tenant, kind, subject_id)
        return await export_inline(self.store, self.checkpoints, plan)

    async def export_job_create(self, p: Params) -> dict[str, Any]:
        """Start building an export in the background; the job (``queued``)."""
        tenant, kind, subject_id = self._subject(p)
        actor = _text(p, "requested_by") or "unknown"
        return await self.exports.create(tenant, kind, subject_id, actor)

    async def export_job(self, p: Params) -> dict[str, Any]:
        """One export job: status and progress."""
        job_id = _text(p, "job_id", required=True)
        assert job_id is not None
        return await self.exports.get(_tenant(p), job_id)

    async def export_jobs(self, p: Params) -> dict[str, Any]:
        """The tenant's export jobs, newest first."""
        limit = _int(p, "limit", default=DEFAULT_LIMIT, low=1, high=MAX_LIMIT) or DEFAULT_LIMIT
        return {"jobs": await self.exports.recent(_tenant(p), limit)}

    async def export_job_part(self, p: Params) -> dict[str, Any]:
        """One part of a done job's file."""
        job_id = _text(p, "job_id", required=True)
        assert job_id is not None
        seq = _int(p, "seq", default=0, low=0, high=10_000_000) or 0
        return await self.exports.part(_tenant(p), job_id, seq)

    async def rebuild(self, p: Params) -> dict[str, Any]:
        """Drop and rebuild every projection from the event store."""
        return await self.projector.rebuild(self.store)

    async def lag(self, p: Params) -> dict[str, Any]:
        """How far the projections are behind the store."""
        return await self.lag_monitor.snapshot()

    # --- what a policy simulation reads (services/audit_replay/simulation_reads.py) -------------

    async def simulation_decisions(self, p: Params) -> dict[str, Any]:
        """A page of recorded decisions of a time window, oldest first."""
        return await simulation_reads.simulation_decisions(self.ch, _tenant(p), p)

    async def step_costs(self, p: Params) -> dict[str, Any]:
        """The recorded cost of every step of some runs."""
        return await simulation_reads.step_costs(self.ch, _tenant(p), p)

    # --- the console's analytics and statements (services/audit_replay/insights.py) -------------

    async def analytics(self, p: Params) -> dict[str, Any]:
        """One analytics view of the tenant over its last ``days`` days."""
        return await insights.analytics(self.ch, _tenant(p), p)

    async def statements(self, p: Params) -> dict[str, Any]:
        """The tenant's monthly statements, newest first."""
        return await insights.statements(self.ch, _tenant(p))

    async def statement(self, p: Params) -> dict[str, Any]:
        """One month's usage and chargeback lines."""
        return await insights.statement(self.ch, _tenant(p), p)


_NO_TOTALS: dict[str, Any] = {"tokens_used": 0, "cost_usd": None, "unpriced_steps": 0}


def _plain(
    fn: Callable[[Params], Awaitable[Any]],
) -> Callable[[dict[str, Any], dict[str, str]], Awaitable[Any]]:
    async def handler(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return await fn(payload)

    return handler


def rpc_server(nc: NATS, queries: AuditQueries) -> RpcServer:
    """An :class:`RpcServer` for ``mc.rpc.audit.*`` with every method registered."""
    server = RpcServer(nc, "audit")
    queries.register(server)
    return server
