"""Policy simulations as jobs: started by ``start_simulation``, read by ``get_simulation``.

A job evaluates a tenant's uploaded bundle (by digest) against the decisions recorded in a time
window. It runs here, in policy-admission, where bundles, settings and exceptions are, and reads
the recorded decisions and step costs from audit-replay's projections a page at a time
(``audit.simulation_decisions``, ``audit.step_costs``): services never read each other's tables.
The candidate is evaluated in worker processes (:class:`~services.policy_admission.
simulation_eval.BatchEvaluator`), so admission on the event loop never waits for a simulation.

It has no side effects: no event is appended and no run, decision or exception changes. The job
itself is a row of ``policy_admission.simulations`` (request, progress, report). Its replica
beats a heartbeat with every page; a job whose heartbeat is older than :data:`LEASE` (its replica
died) is taken over by a replica's :meth:`SimulationJobs.follow` and run again from the start,
which, without side effects, gives the same report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from libs import policy_bundles as artifacts
from libs.contracts import new_uuid7
from libs.contracts.events import Reason
from libs.contracts.limits import AGENT_ID_PATTERN
from libs.contracts.policy import BUNDLE_DIGEST_PATTERN, DEFAULT_ENVIRONMENT, Environment
from libs.errors import InvalidInput, NotFound, PermanentError, TooLarge, TransientError
from libs.eventbus.db import transaction
from libs.eventbus.store import EventStore
from libs.policy_bundles import BundleNotFound
from libs.redaction import redact_text
from services.policy_admission import exceptions as waivers
from services.policy_admission.listing import Page, page_of
from services.policy_admission.simulation import (
    RecordedDecision,
    Tally,
    rebuild_input,
    report_csv,
    simulated_decision,
)
from services.policy_admission.simulation_eval import BatchEvaluator
from services.policy_admission.tenant_bundles import TenantPolicies, bundles_entity

log = structlog.get_logger("policy_admission")

AUDIT = "audit"
SIMULATION_DECISIONS = "simulation_decisions"
STEP_COSTS = "step_costs"
MAX_WINDOW = timedelta(days=31)
PAGE = 2000
MIN_PAGE = 50
COST_RUNS = 1000
LEASE = timedelta(seconds=120)
FOLLOW_INTERVAL_S = 5.0
AUDIT_TIMEOUT_S = 30.0
AUDIT_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Waits between attempts of a read audit-replay could not answer now (a projection rebuild,
a restart): about half a minute in all, then the job fails naming why."""

Audit = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""Sends one request to audit-replay: ``(method, payload) -> result``."""


class SimulationRequest(BaseModel):
    """What to simulate: a candidate bundle on the decisions of ``[since, until)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_digest: str = Field(pattern=BUNDLE_DIGEST_PATTERN)
    since: datetime
    until: datetime
    agent_id: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    environment: Environment = DEFAULT_ENVIRONMENT
    """The environment the candidate was uploaded to (and read for decisions recorded before
    decisions named their environment)."""


def check_window(request: SimulationRequest) -> None:
    """422 for a window without a zone, inverted or empty, or longer than :data:`MAX_WINDOW`."""
    if request.since.tzinfo is None or request.until.tzinfo is None:
        raise InvalidInput("simulation_window_invalid: since and until must carry a time zone")
    if request.until <= request.since:
        raise InvalidInput(
            f"simulation_window_inverted: until ({request.until.isoformat()}) is not after "
            f"since ({request.since.isoformat()})"
        )
    if request.until - request.since > MAX_WINDOW:
        raise InvalidInput(
            f"simulation_window_too_long: a simulation covers at most {MAX_WINDOW.days} days"
        )


def _record(row: dict[str, Any]) -> RecordedDecision:
    return RecordedDecision(
        decision_id=row["decision_id"],
        run_id=row["run_id"],
        step_index=int(row["step_index"]),
        outcome=row["outcome"],
        reasons=tuple(Reason.model_validate(r) for r in row["reasons"]),
        context=row["context"],
        occurred_at=datetime.fromisoformat(row["occurred_at"]),
    )


def _costs(rows: dict[str, list[list[Any]]]) -> dict[str, dict[int, Decimal | None]]:
    return {
        run_id: {int(i): None if c is None else Decimal(str(c)) for i, c in steps}
        for run_id, steps in rows.items()
    }


def _job(row: dict[str, Any]) -> dict[str, Any]:
    """What a view and a listing show of a job, without its report."""
    return {
        "simulation_id": row["simulation_id"],
        "status": row["status"],
        "request": row["request"],
        "requested_by": row["requested_by"],
        "progress": row["progress"],
        "error": row["error"],
        "created_at": row["created_at"].astimezone(UTC).isoformat(),
        "updated_at": row["updated_at"].astimezone(UTC).isoformat(),
    }


def _view(row: dict[str, Any], fmt: str = "json") -> dict[str, Any]:
    view = {**_job(row), "report": row["report"]}
    if fmt == "csv":
        view["csv"] = None if row["report"] is None else report_csv(row["report"])
    return view


SIMULATION_ID_PATTERN = r"^[0-9a-f-]{36}$"

# A done job's report can hold thousands of flips: a listing takes only its totals, in SQL, so
# the reports never leave the database.
_SUMMARY_SQL = (
    "CASE WHEN report IS NULL THEN NULL ELSE jsonb_build_object("
    "'decisions', report->'decisions', 'flipped', report->'flipped', 'waived', report->'waived', "
    "'errors', report->'errors', 'runs_stopped', report->'runs_stopped', "
    "'prevented_cost_usd', report->'prevented_cost_usd') END"
)


class SimulationJobs:
    """Starts, runs, resumes and shows one replica's simulations."""

    def __init__(
        self,
        store: EventStore,
        tenants: TenantPolicies,
        audit: Audit,
        *,
        workers: int | None = None,
        page: int = PAGE,
    ) -> None:
        self.store = store
        self.tenants = tenants
        self.audit = audit
        self.workers = workers
        self.page = page
        self._running: dict[str, asyncio.Task[None]] = {}

    # -- requests ------------------------------------------------------------------------------

    async def start(self, tenant_id: str, request: SimulationRequest, actor: str) -> dict[str, Any]:
        """Check the request, record the job and start it; its view (status ``queued``)."""
        check_window(request)
        uploaded = await self.tenants.bundles.load(tenant_id, bundles_entity(request.environment))
        if request.bundle_digest not in uploaded.uploaded:
            raise BundleNotFound(
                "bundle_not_found",
                f"no bundle {request.bundle_digest} was uploaded to {request.environment}",
            )
        simulation_id = str(new_uuid7())
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO policy_admission.simulations "
                "(simulation_id, tenant_id, request, requested_by, status) "
                "VALUES (%s, %s, %s, %s, 'queued') RETURNING *",
                (
                    simulation_id,
                    tenant_id,
                    orjson.dumps(request.model_dump(mode="json")).decode(),
                    actor,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        self._spawn(tenant_id, simulation_id)
        return _view(row)

    async def get(self, tenant_id: str, simulation_id: str, fmt: str = "json") -> dict[str, Any]:
        """The job's status, progress and (when done) report; 404 for another tenant's."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT * FROM policy_admission.simulations "
                "WHERE tenant_id = %s AND simulation_id = %s",
                (tenant_id, simulation_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"simulation_not_found: no simulation {simulation_id!r}")
        return _view(row, fmt)

    async def listing(self, tenant_id: str, status: str | None, page: Page) -> dict[str, Any]:
        """The tenant's jobs, newest first, without their reports (a done job's totals as
        ``summary``), of one ``status`` or all; and the next page's cursor."""
        after_at, after_id = page.after or (None, None)
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT simulation_id, status, request, requested_by, progress, error,"
                f" created_at, updated_at, {_SUMMARY_SQL} AS summary"
                " FROM policy_admission.simulations WHERE tenant_id = %(tenant)s"
                " AND (%(status)s::text IS NULL OR status = %(status)s)"
                " AND (%(after_at)s::timestamptz IS NULL"
                "      OR (created_at, simulation_id) < (%(after_at)s, %(after_id)s::text))"
                " ORDER BY created_at DESC, simulation_id DESC LIMIT %(limit)s",
                {
                    "tenant": tenant_id, "status": status, "after_at": after_at,
                    "after_id": after_id, "limit": page.limit + 1,
                },
            )  # fmt: skip
            rows = await cur.fetchall()
        shown, cursor = page_of(rows, page, "created_at", "simulation_id")
        return {
            "simulations": [{**_job(r), "summary": r["summary"]} for r in shown],
            "next_cursor": cursor,
        }

    # -- running -------------------------------------------------------------------------------

    def _spawn(self, tenant_id: str, simulation_id: str) -> None:
        if simulation_id in self._running:
            return
        task = asyncio.create_task(
            self._run(tenant_id, simulation_id), name=f"simulation-{simulation_id}"
        )
        self._running[simulation_id] = task
        task.add_done_callback(lambda _: self._running.pop(simulation_id, None))

    async def follow(self) -> None:
        """Take over, every few seconds, the jobs whose replica stopped beating their heartbeat."""
        while True:
            try:
                await self.take_over()
            except Exception as exc:
                log.warning("simulation.take_over_failed", error=redact_text(str(exc))[:500])
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def take_over(self, lease: timedelta = LEASE) -> list[str]:
        """Claim the unfinished jobs whose heartbeat is older than ``lease`` and run them."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "UPDATE policy_admission.simulations SET heartbeat_at = now() "
                "WHERE simulation_id IN (SELECT simulation_id FROM policy_admission.simulations "
                "WHERE status IN ('queued', 'running') AND heartbeat_at < now() - %s "
                "FOR UPDATE SKIP LOCKED LIMIT 10) RETURNING tenant_id, simulation_id",
                (lease,),
            )
            rows = await cur.fetchall()
        for r in rows:
            self._spawn(r["tenant_id"], r["simulation_id"])
        return [r["simulation_id"] for r in rows]

    async def stop(self) -> None:
        """Cancel this replica's jobs (another replica takes them over after the lease)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, method: str, payload: dict[str, Any]) -> Any:
        """One audit-replay read, tried again after a transient failure."""
        for wait in (*AUDIT_RETRIES, None):
            try:
                return await self.audit(method, payload)
            except TransientError:
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def _update(self, simulation_id: str, **columns: Any) -> None:
        sets = ", ".join(f"{name} = %s" for name in columns)
        values = [
            orjson.dumps(v).decode() if name in ("progress", "report") else v
            for name, v in columns.items()
        ]
        async with transaction(self.store.pool) as conn:
            await conn.execute(
                f"UPDATE policy_admission.simulations SET {sets}, updated_at = now(), "
                "heartbeat_at = now() WHERE simulation_id = %s",
                (*values, simulation_id),
            )

    async def _run(self, tenant_id: str, simulation_id: str) -> None:
        try:
            async with transaction(self.store.pool) as conn:
                cur = await conn.execute(
                    "SELECT request FROM policy_admission.simulations WHERE simulation_id = %s",
                    (simulation_id,),
                )
                row = await cur.fetchone()
            if row is None:
                return
            request = SimulationRequest.model_validate(row["request"])
            await self._update(simulation_id, status="running", progress={"decisions": 0})
            report = await self.simulate(tenant_id, simulation_id, request)
            await self._update(simulation_id, status="done", report=report)
            log.info(
                "simulation.done",
                tenant_id=tenant_id,
                simulation_id=simulation_id,
                decisions=report["decisions"],
                flipped=report["flipped"],
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = redact_text(str(exc))[:1000] or type(exc).__name__
            log.warning("simulation.failed", simulation_id=simulation_id, error=message)
            await self._update(simulation_id, status="failed", error=message)

    async def simulate(
        self, tenant_id: str, simulation_id: str, request: SimulationRequest
    ) -> dict[str, Any]:
        """Read the window's decisions page by page, evaluate the candidate on them, apply the
        exceptions of the time, and build the report."""
        archive = await self.tenants.read_archive(tenant_id, request.bundle_digest)
        modules, _ = artifacts.content_of(artifacts.extract(archive))
        history = await self.tenants.exceptions.load(tenant_id, waivers.EXCEPTIONS_ENTITY)
        tally = Tally()
        span = (request.until - request.since).total_seconds()
        query: dict[str, Any] = {
            "tenant_id": tenant_id,
            "since": request.since.isoformat(),
            "until": request.until.isoformat(),
            "limit": self.page,
        }
        if request.agent_id is not None:
            query["agent_id"] = request.agent_id
        with BatchEvaluator(request.bundle_digest, modules, workers=self.workers) as evaluator:
            while True:
                try:
                    page = await self._read(SIMULATION_DECISIONS, query)
                except TooLarge:
                    # Over the bus's message size (large contexts): ask for fewer at a time.
                    if query["limit"] <= MIN_PAGE:
                        raise
                    query["limit"] = max(MIN_PAGE, query["limit"] // 2)
                    continue
                records = [_record(r) for r in page["decisions"]]
                await self._evaluate(tenant_id, request, records, evaluator, tally, history)
                done = (
                    1.0
                    if page["next"] is None or not records
                    else (records[-1].occurred_at - request.since).total_seconds() / span
                )
                await self._update(
                    simulation_id,
                    progress={
                        "decisions": tally.decisions,
                        "fraction": round(min(1.0, max(0.0, done)), 4),
                        "evaluated": evaluator.evaluated,
                    },
                )
                if page["next"] is None or not records:
                    break
                query["after"] = page["next"]
        runs = sorted(tally.stops)
        costs: dict[str, dict[int, Decimal | None]] = {}
        for i in range(0, len(runs), COST_RUNS):
            answer = await self._read(
                STEP_COSTS, {"tenant_id": tenant_id, "run_ids": runs[i : i + COST_RUNS]}
            )
            costs.update(_costs(answer["runs"]))
        report = tally.report(costs)
        report["errors"] = tally.errors
        report["bundle_digest"] = request.bundle_digest
        return report

    async def _evaluate(
        self,
        tenant_id: str,
        request: SimulationRequest,
        records: Sequence[RecordedDecision],
        evaluator: BatchEvaluator,
        tally: Tally,
        history: waivers.Exceptions,
    ) -> None:
        settings = self.tenants.settings_for(tenant_id)
        inputs = [
            rebuild_input(
                tenant_id,
                r.step_index,
                r.context,
                environment=request.environment,
                settings=settings,
            )
            for r in records
        ]
        for record, raw in zip(records, await evaluator.evaluate(inputs), strict=True):
            if record.context.get("environment", request.environment) != request.environment:
                continue  # decided by another environment's bundle
            try:
                if raw is None:
                    raise PermanentError("the candidate's decision is undefined")
                tally.add(record, simulated_decision(raw, record, history.waivers))
            except PermanentError:
                tally.errors += 1
