"""Full exports of a run or a workflow execution, at once or as jobs.

An export holds every event of the subject's streams with its hash link, the newest signed
checkpoint and each stream head's inclusion proof under it (format and checks:
:mod:`libs.eventbus.export`; ``mctl verify-export`` checks a file offline). The streams:

* a run: its run, decisions and cost streams and the streams of its incidents;
* a workflow execution: its execution stream, and the above for every run its steps were
  dispatched as (``execution.step_dispatched`` names each attempt's run).

``export_events`` answers the whole file at once (up to :data:`MAX_INLINE_BYTES`, sent in parts
over the bus when larger than a message). Larger ones run as jobs (:class:`ExportJobs`): a row of
``audit_replay.export_jobs`` with its progress (events written of the total), the file kept in
parts of whole lines (``audit_replay.export_parts``) and downloaded one part per request. A job
left unfinished when its process stopped is built again from the start by the next one (exports
have no side effects, so a second build is the same file but for its ``created_at``); one
interrupted :data:`MAX_ATTEMPTS` times fails, naming why.

Other long documents reuse the jobs (their table, parts, progress and take-over): a module
registers how to build its kind (:meth:`ExportJobs.register`; the SOC2 evidence of
:mod:`services.audit_replay.evidence_queries`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from psycopg.types.json import Jsonb

from libs.contracts import new_uuid7
from libs.contracts.envelope import stream_id_for
from libs.errors import Conflict, InvalidInput, NotFound, PermanentError, TooLarge
from libs.eventbus.anchor import heads_at, latest_checkpoint
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.export import (
    HeadTree,
    end_record,
    event_record,
    header_record,
    line,
    proof_records,
)
from libs.eventbus.store import EventStore, row_to_envelope
from libs.redaction import redact_text

log = structlog.get_logger("audit")

SubjectType = Literal["run", "execution"]
SUBJECT_TYPES: tuple[str, ...] = ("run", "execution")
EXECUTION_CATEGORY = "execution"
DISPATCHED = "execution.step_dispatched"
MAX_INLINE_BYTES = 48 * 1024 * 1024
PART_BYTES = 256 * 1024
MAX_ATTEMPTS = 3
LEASE = timedelta(seconds=60)
FOLLOW_INTERVAL_S = 5.0
CONTENT_TYPE = "application/x-ndjson"

Emit = Callable[[bytes], Awaitable[None]]
Progress = Callable[[int], Awaitable[None]]
JobProgress = Callable[[int, int], Awaitable[None]]
"""Reports a job's progress: items done of the total."""
JobBuild = Callable[[dict[str, Any], Emit, JobProgress], Awaitable[dict[str, Any]]]
"""Builds a job from its row: writes its file to ``emit`` and reports progress; answers the
columns to set once done (``done``, ``total``, and ``checkpoint_seq`` or ``result``)."""


@dataclass(frozen=True)
class ExportPlan:
    """What one export holds: the subject's streams and how many events they had when planned."""

    tenant_id: str
    subject_type: str
    subject_id: str
    streams: list[str]
    total: int


def _run_streams(tenant_id: str, run_id: str) -> list[str]:
    return [stream_id_for(tenant_id, c, run_id) for c in ("run", "decisions", "cost")]


async def plan_export(
    store: EventStore, tenant_id: str, subject_type: str, subject_id: str
) -> ExportPlan:
    """The streams of a run or an execution that hold events; 404 when none does."""
    if subject_type == "run":
        runs, base = [subject_id], []
    elif subject_type == "execution":
        base = [stream_id_for(tenant_id, EXECUTION_CATEGORY, subject_id)]
        runs = await store.payload_values(tenant_id, base[0], DISPATCHED, "run_id")
    else:
        raise InvalidInput(f"subject_type must be one of {', '.join(SUBJECT_TYPES)}")
    wanted = base + [s for r in runs for s in _run_streams(tenant_id, r)]
    wanted += await store.linked_streams(tenant_id, "incident.opened", "run_id", runs)
    counts = await store.stream_counts(tenant_id, wanted)
    streams = [s for s in wanted if counts.get(s)]
    if not streams:
        raise NotFound(f"{subject_type} {subject_id} has no events")
    return ExportPlan(tenant_id, subject_type, subject_id, streams, sum(counts.values()))


class Checkpoints:
    """The newest signed checkpoint and the tree of every stream head at its horizon (kept for
    the newest one: what a checkpoint covers never changes)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._seq: int | None = None
        self._tree: HeadTree | None = None
        self._lock = asyncio.Lock()

    async def latest(self) -> tuple[dict[str, Any], HeadTree] | None:
        """The checkpoint's row and its heads' tree; ``None`` before the first checkpoint."""
        async with self._lock, self.store.pool.connection() as raw:
            conn: AsyncConn = raw  # type: ignore[assignment]
            row = await latest_checkpoint(conn)
            if row is None:
                return None
            seq = int(row["payload"]["seq"])
            if self._seq != seq or self._tree is None:
                heads = await heads_at(conn, int(row["payload"]["horizon_xid"]))
                tree = HeadTree.of(heads.heads)
                if tree.root().hex() != row["payload"]["merkle_root"]:
                    raise PermanentError(
                        f"the event store does not match checkpoint {seq}'s signed root: run "
                        "`mctl verify` to find what changed"
                    )
                self._seq, self._tree = seq, tree
            return row, self._tree


async def write_export(
    store: EventStore,
    checkpoints: Checkpoints,
    plan: ExportPlan,
    emit: Emit,
    progress: Progress | None = None,
) -> int | None:
    """Write ``plan``'s export line by line to ``emit``; the checkpoint's sequence number."""
    # The checkpoint is read before the events, so every head it covers is in the export.
    latest = await checkpoints.latest()
    created = datetime.now(UTC).isoformat()
    await emit(
        line(
            header_record(plan.subject_type, plan.subject_id, plan.tenant_id, created, plan.streams)
        )
    )
    tails: dict[str, tuple[int, bytes]] = {}
    written = 0
    async for batch in store.iter_chain(plan.tenant_id, plan.streams):
        chunk = bytearray()
        for e in batch:
            chunk += line(event_record(e.envelope, e.prev_hash, e.hash, e.hash_scheme))
            tails[e.envelope.stream_id] = (e.envelope.stream_version, e.hash)
        written += len(batch)
        await emit(bytes(chunk))
        if progress is not None:
            await progress(written)
    seq: int | None = None
    if latest is not None:
        row, tree = latest
        env = row_to_envelope(row)
        await emit(
            line(
                event_record(
                    env,
                    bytes(row["prev_hash"]),
                    bytes(row["hash"]),
                    int(row["hash_scheme"]),
                    "checkpoint",
                )
            )
        )
        seq = int(row["payload"]["seq"])
        for rec in proof_records(tree, plan.streams):
            await emit(line(rec))
    await emit(line(end_record(written, tails)))
    return seq


async def export_inline(
    store: EventStore, checkpoints: Checkpoints, plan: ExportPlan
) -> dict[str, Any]:
    """The whole export as one answer; 413 past :data:`MAX_INLINE_BYTES` (use a job)."""
    parts: list[bytes] = []
    size = 0

    async def emit(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_INLINE_BYTES:
            raise TooLarge(
                f"the export is over {MAX_INLINE_BYTES:,} bytes: start it as a job "
                "(POST /v1/exports, `mctl export`)"
            )
        parts.append(data)

    await write_export(store, checkpoints, plan, emit)
    return {"content_type": CONTENT_TYPE, "body": b"".join(parts).decode()}


# --- jobs ----------------------------------------------------------------------------------------


def job_view(row: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it."""
    return {
        "job_id": row["job_id"],
        "status": row["status"],
        "subject": {"type": row["subject_type"], "id": row["subject_id"]},
        "requested_by": row["requested_by"],
        "progress": {"done": int(row["done"]), "total": int(row["total"])},
        "bytes": int(row["bytes"]),
        "parts": int(row["parts"]),
        "attempts": int(row["attempts"]),
        "checkpoint_seq": row["checkpoint_seq"],
        "error": row["error"],
        "created_at": row["created_at"].astimezone(UTC).isoformat(),
        "updated_at": row["updated_at"].astimezone(UTC).isoformat(),
    }


class ExportJobs:
    """Creates, builds, resumes and serves the export jobs."""

    def __init__(self, store: EventStore, checkpoints: Checkpoints) -> None:
        self.store = store
        self.checkpoints = checkpoints
        self._running: dict[str, asyncio.Task[None]] = {}
        self.builders: dict[str, JobBuild] = {k: self._build_export for k in SUBJECT_TYPES}

    def register(self, kind: str, build: JobBuild) -> None:
        """Build the jobs whose ``subject_type`` is ``kind`` with ``build`` (another service
        module's documents, kept in the same table and parts)."""
        self.builders[kind] = build

    async def create(
        self, tenant_id: str, subject_type: str, subject_id: str, actor: str
    ) -> dict[str, Any]:
        """Check the subject exists, record the job and start it; its view (``queued``)."""
        plan = await plan_export(self.store, tenant_id, subject_type, subject_id)
        return job_view(await self.insert(tenant_id, subject_type, subject_id, actor, plan.total))

    async def insert(
        self,
        tenant_id: str,
        kind: str,
        subject_id: str,
        actor: str,
        total: int,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a ``queued`` job of ``kind`` and start building it; its row."""
        job_id = str(new_uuid7())
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO audit_replay.export_jobs (job_id, tenant_id, subject_type, "
                "subject_id, requested_by, status, total, params) "
                "VALUES (%s, %s, %s, %s, %s, 'queued', %s, %s) RETURNING *",
                (
                    job_id,
                    tenant_id,
                    kind,
                    subject_id,
                    actor,
                    total,
                    None if params is None else Jsonb(params),
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        self._spawn(job_id)
        return row

    async def row(
        self, tenant_id: str, job_id: str, kinds: tuple[str, ...] = SUBJECT_TYPES
    ) -> dict[str, Any]:
        """One job's row, of the tenant and of one of ``kinds``; 404 otherwise."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT * FROM audit_replay.export_jobs WHERE tenant_id = %s AND job_id = %s "
                "AND subject_type = ANY(%s)",
                (tenant_id, job_id, list(kinds)),
            )
            row: dict[str, Any] | None = await cur.fetchone()
        if row is None:
            raise NotFound(f"{_noun(kinds)} job {job_id} not found")
        return row

    async def get(self, tenant_id: str, job_id: str) -> dict[str, Any]:
        """One job of the tenant; 404 for another tenant's."""
        return job_view(await self.row(tenant_id, job_id))

    async def recent(self, tenant_id: str, limit: int) -> list[dict[str, Any]]:
        """The tenant's jobs, newest first."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT * FROM audit_replay.export_jobs WHERE tenant_id = %s "
                "AND subject_type = ANY(%s) ORDER BY created_at DESC, job_id DESC LIMIT %s",
                (tenant_id, list(SUBJECT_TYPES), limit),
            )
            return [job_view(r) for r in await cur.fetchall()]

    async def part(self, tenant_id: str, job_id: str, seq: int) -> dict[str, Any]:
        """Part ``seq`` of a finished job's file, and the next part's number (``None`` at the
        end); 409 while the job is not done."""
        data, nxt, _ = await self.raw_part(tenant_id, job_id, seq)
        return {"seq": seq, "data": data.decode(), "next": nxt}

    async def raw_part(
        self, tenant_id: str, job_id: str, seq: int, kinds: tuple[str, ...] = SUBJECT_TYPES
    ) -> tuple[bytes, int | None, dict[str, Any]]:
        """Part ``seq`` of a finished job of one of ``kinds``, the next part's number (``None``
        at the end) and the job's ``result``; 409 while the job is not done."""
        noun = _noun(kinds)
        async with transaction(self.store.pool) as conn:
            # The job and the part in one read: a download asks for every part in turn.
            cur = await conn.execute(
                "SELECT j.status, j.parts, j.result, p.data FROM audit_replay.export_jobs j "
                "LEFT JOIN audit_replay.export_parts p ON p.job_id = j.job_id AND p.seq = %s "
                "WHERE j.tenant_id = %s AND j.job_id = %s AND j.subject_type = ANY(%s)",
                (seq, tenant_id, job_id, list(kinds)),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{noun} job {job_id} not found")
        if row["status"] != "done":
            raise Conflict(f"{noun} job {job_id} is {row['status']}, not done")
        if row["data"] is None:
            raise NotFound(f"{noun} job {job_id} has {row['parts']} parts, no part {seq}")
        nxt = seq + 1 if seq + 1 < int(row["parts"]) else None
        return bytes(row["data"]), nxt, dict(row["result"] or {})

    # -- running -------------------------------------------------------------------------------

    def _spawn(self, job_id: str) -> None:
        if job_id in self._running:
            return
        task = asyncio.create_task(self._run(job_id), name=f"export-{job_id}")
        self._running[job_id] = task
        task.add_done_callback(lambda _: self._running.pop(job_id, None))

    async def follow(self) -> None:
        """Take over, every few seconds, the jobs whose process stopped beating their heartbeat
        (at once for the first round: this process is the only one building exports)."""
        lease = timedelta(0)
        while True:
            try:
                await self.take_over(lease)
            except Exception as exc:
                log.warning("export.take_over_failed", error=redact_text(str(exc))[:500])
            lease = LEASE
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def take_over(self, lease: timedelta = LEASE) -> list[str]:
        """Claim the unfinished jobs whose heartbeat is older than ``lease`` and build them."""
        running = list(self._running)
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "UPDATE audit_replay.export_jobs SET heartbeat_at = now() "
                "WHERE job_id IN (SELECT job_id FROM audit_replay.export_jobs "
                "WHERE status IN ('queued', 'running') AND heartbeat_at <= now() - %s "
                "AND job_id <> ALL(%s) FOR UPDATE SKIP LOCKED LIMIT 10) RETURNING job_id",
                (lease, running),
            )
            rows = await cur.fetchall()
        for r in rows:
            self._spawn(r["job_id"])
        return [r["job_id"] for r in rows]

    async def stop(self) -> None:
        """Cancel the jobs being built (the next start takes them over)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _update(self, job_id: str, **columns: Any) -> None:
        sets = "".join(f"{name} = %s, " for name in columns)
        async with transaction(self.store.pool) as conn:
            await conn.execute(
                f"UPDATE audit_replay.export_jobs SET {sets}updated_at = now(), "
                "heartbeat_at = now() WHERE job_id = %s",
                (*columns.values(), job_id),
            )

    async def _run(self, job_id: str) -> None:
        try:
            async with transaction(self.store.pool) as conn:
                cur = await conn.execute(
                    "UPDATE audit_replay.export_jobs SET attempts = attempts + 1 "
                    "WHERE job_id = %s RETURNING *",
                    (job_id,),
                )
                row = await cur.fetchone()
                # A build that starts again starts from an empty file.
                await conn.execute(
                    "DELETE FROM audit_replay.export_parts WHERE job_id = %s", (job_id,)
                )
            if row is None or row["status"] in ("done", "failed"):
                return
            if int(row["attempts"]) > MAX_ATTEMPTS:
                await self._update(
                    job_id,
                    status="failed",
                    error=f"interrupted {MAX_ATTEMPTS} times (the service stopped while "
                    "building it); start a new export",
                )
                return
            await self._update(job_id, status="running", done=0, bytes=0, parts=0)
            await self._build(job_id, row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = redact_text(str(exc))[:1000] or type(exc).__name__
            log.warning("export.failed", job_id=job_id, error=message)
            await self._update(job_id, status="failed", error=message)

    async def _build(self, job_id: str, row: dict[str, Any]) -> None:
        build = self.builders.get(row["subject_type"])
        if build is None:
            raise PermanentError(f"no builder for {row['subject_type']} jobs")
        buf = bytearray()
        parts = 0
        size = 0

        async def flush() -> None:
            nonlocal parts, buf
            if not buf:
                return
            async with transaction(self.store.pool) as conn:
                await conn.execute(
                    "INSERT INTO audit_replay.export_parts (job_id, seq, data) VALUES (%s, %s, %s)",
                    (job_id, parts, bytes(buf)),
                )
            parts += 1
            buf = bytearray()

        async def emit(data: bytes) -> None:
            # Parts end at line ends, so each one is whole NDJSON records (and whole UTF-8).
            nonlocal size
            size += len(data)
            start = 0
            while start < len(data):
                end = data.find(b"\n", start) + 1 or len(data)
                buf.extend(data[start:end])
                start = end
                if len(buf) >= PART_BYTES:
                    await flush()

        async def progress(done: int, total: int) -> None:
            await self._update(job_id, done=done, total=max(total, done), bytes=size)

        columns = await build(row, emit, progress)
        if "result" in columns:
            columns["result"] = Jsonb(columns["result"])
        await flush()
        await self._update(job_id, status="done", bytes=size, parts=parts, **columns)
        log.info("export.done", job_id=job_id, kind=row["subject_type"], bytes=size, parts=parts)

    async def _build_export(
        self, row: dict[str, Any], emit: Emit, progress: JobProgress
    ) -> dict[str, Any]:
        plan = await plan_export(
            self.store, row["tenant_id"], row["subject_type"], row["subject_id"]
        )
        written = 0

        async def written_so_far(done: int) -> None:
            nonlocal written
            written = done
            await progress(done, plan.total)

        seq = await write_export(self.store, self.checkpoints, plan, emit, written_so_far)
        return {"done": written, "total": max(plan.total, written), "checkpoint_seq": seq}


def _noun(kinds: tuple[str, ...]) -> str:
    """How a job of ``kinds`` is named in errors."""
    return "export" if set(kinds) <= set(SUBJECT_TYPES) else "evidence"
