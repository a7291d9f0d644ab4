"""Evidence documents over NATS request–reply (``mc.rpc.audit.<method>``), read from the event
store (the system of record) rather than the projections.

* ``evidence_soc2``: ``from``, ``to`` (ISO 8601 with a time zone), ``format`` (json, csv, pdf)
  → the signed SOC2 evidence of the tenant's period.
* ``evidence_soc2_job_create``: ``from``, ``to``, ``format``, ``requested_by`` → the same
  document built as a job (:class:`~services.audit_replay.exports.ExportJobs`, pinned when
  created); ``evidence_soc2_job``: ``job_id`` → the job, its progress the period's events read
  of the total; ``evidence_soc2_job_part``: ``job_id``, ``seq`` → ``{seq, data_b64, next,
  document}`` (a done job's file a part at a time, and its type, name, sha256 and signature).
* ``debrief``: ``incident_id``, ``format`` (md, html, pdf, json) → one incident's debrief.
* ``debriefs``: ``from``, ``to``, ``format`` → every incident opened in the period, debriefed.
* ``attest``: ``standard`` (soc2, iso27001), ``from``, ``to``, ``actor`` → generates a compliance
  attestation, records it as ``evidence.attestation_generated`` and answers its record.
* ``attestations`` → the tenant's attestation history, newest first.
* ``attestation``: ``attestation_id``, ``format`` (json, pdf) → a recorded
  attestation, generated again from its recorded pin and checked against its recorded sha256.

Every document answer is ``{content_type, filename, size, sha256, body_b64, signature, pin}``:
the whole file, whatever its size (the RPC layer sends an answer larger than a NATS message in
parts, :mod:`libs.eventbus.rpc`). The ``pin`` is the store position read up to and the generation
time: the document is deterministic given those (reportlab's invariant mode, ed25519's
deterministic signatures), which is how an attestation is generated again to its recorded sha256.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope, new_uuid7
from libs.contracts.events import AttestationGenerated
from libs.errors import Conflict, InvalidInput, NotFound, PermanentError
from libs.eventbus.anchor import CHECKPOINT_STREAM
from libs.eventbus.store import START, EventStore
from libs.evidence_signing import sha256_hex, sign_statement, signed_json
from services.audit_replay.domain.attestation import (
    ATTESTATION_EVENT,
    STANDARDS,
    attestation,
    attestation_report,
)
from services.audit_replay.domain.debrief import (
    debrief_report,
    incident_debrief,
    period_debrief_report,
)
from services.audit_replay.domain.evidence import (
    SHARED_TENANT,
    Period,
    evidence_csv,
    evidence_report,
    soc2_evidence,
)
from services.audit_replay.entrypoints import _tenant, _text
from services.audit_replay.exports import PART_BYTES, Emit, ExportJobs, JobProgress
from services.audit_replay.handlers import read_run_history
from services.audit_replay.reports.render import render

MAX_PERIOD = timedelta(days=400)
MAX_DEBRIEFS = 100
READ_BATCH = 5000
CONTENT_TYPES = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "pdf": "application/pdf",
    "md": "text/markdown; charset=utf-8",
    "html": "text/html; charset=utf-8",
}
SOC2_FORMATS = ("json", "csv", "pdf")
ATTESTATION_FORMATS = ("json", "pdf")
ATTESTATION_CATEGORY = "attestation"
DEBRIEF_FORMATS = ("md", "html", "pdf", "json")
# matplotlib's pyplot is not thread-safe: one document renders at a time.
_RENDER_LOCK = threading.Lock()

SOC2_JOB = "evidence_soc2"
Params = Mapping[str, Any]
Document = tuple[bytes, dict[str, Any]]
Read = Callable[[int], Awaitable[None]]
"""Told how many events were read so far."""


def parse_instant(p: Params, name: str) -> datetime:
    """The ISO 8601 instant ``p[name]`` (with a time zone), in UTC."""
    v = p.get(name)
    if not isinstance(v, str) or not v or len(v) > 64:
        raise InvalidInput(f"{name} is required: an ISO 8601 time with a time zone")
    try:
        at = datetime.fromisoformat(v)
    except ValueError:
        raise InvalidInput(f"{name} is not an ISO 8601 time: {v[:64]!r}") from None
    if at.tzinfo is None:
        raise InvalidInput(f"{name} needs a time zone (for example 2026-01-01T00:00:00Z)")
    return at.astimezone(UTC)


def parse_period(tenant: str, p: Params) -> Period:
    """The period ``[from, to)`` of ``p``: from before to, at most :data:`MAX_PERIOD` long."""
    start, end = parse_instant(p, "from"), parse_instant(p, "to")
    if end <= start:
        raise InvalidInput("the period is empty: from must be before to")
    if end - start > MAX_PERIOD:
        raise InvalidInput(f"the period is longer than {MAX_PERIOD.days} days")
    return Period(tenant, start, end)


def _choice(p: Params, name: str, choices: tuple[str, ...]) -> str:
    v = p.get(name)
    if v not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}")
    return str(v)


class EvidenceQueries:
    """SOC2 evidence and debriefs, read from the event store and signed."""

    def __init__(self, store: EventStore, key: Ed25519PrivateKey) -> None:
        self.store = store
        self.key = key
        self.jobs: ExportJobs | None = None

    def routes(self) -> dict[str, Callable[[Params], Awaitable[Any]]]:
        """Method name → handler."""
        return {
            "evidence_soc2": self.evidence_soc2,
            "evidence_soc2_job_create": self.evidence_soc2_job_create,
            "evidence_soc2_job": self.evidence_soc2_job,
            "evidence_soc2_job_part": self.evidence_soc2_job_part,
            "debrief": self.debrief,
            "debriefs": self.debriefs,
            "attest": self.attest,
            "attestations": self.attestations,
            "attestation": self.attestation,
        }

    # --- reading the store ----------------------------------------------------------------------

    async def tenant_events(self, tenant: str, as_of: int) -> list[EventEnvelope]:
        """The tenant's events and the shared policy bundle's activations, at or below position
        ``as_of`` (the shared tenant's other streams, its checkpoints, are not evidence)."""
        out = [
            e
            for e in await self.store.read_stream(stream_id_for(SHARED_TENANT, "policy", "bundle"))
            if (e.position or 0) <= as_of
        ]
        cursor = START
        while True:
            page = await self.store.read_log(cursor, READ_BATCH, tenant_id=tenant)
            out += [e for e in page.events if (e.position or 0) <= as_of]
            if len(page.events) < READ_BATCH:
                break
            cursor = page.cursor
        return out

    async def period_events(
        self, period: Period, as_of: int, progress: Read | None = None
    ) -> list[EventEnvelope]:
        """What SOC2 evidence of ``period`` is made from: the tenant's events that occurred in
        it and the shared policy bundle's, at or below position ``as_of``, read by time range
        rather than the whole log; ``progress`` is told how many of them were read so far."""
        out = [
            e
            for e in await self.store.read_stream(stream_id_for(SHARED_TENANT, "policy", "bundle"))
            if (e.position or 0) <= as_of
        ]
        after = read = 0
        while True:
            page = await self.store.read_occurred(
                period.tenant,
                period.start,
                period.end,
                up_to_position=as_of,
                after_position=after,
                limit=READ_BATCH,
            )
            out += page
            read += len(page)
            if progress is not None:
                await progress(read)
            if len(page) < READ_BATCH:
                return out
            after = page[-1].position or after

    async def checkpoint(self, as_of: int) -> dict[str, Any] | None:
        """The newest signed checkpoint at or below position ``as_of`` (``None``: none yet)."""
        head = await self.store.stream_head(CHECKPOINT_STREAM)
        if head is None:
            return None
        version = head.version
        while version >= 1:
            batch = await self.store.read_stream(CHECKPOINT_STREAM, max(1, version - 49))
            for e in reversed(batch):
                if (
                    e.stream_version <= version
                    and (e.position or 0) <= as_of
                    and e.payload.get("signature")
                ):
                    return {**e.payload, "event_id": str(e.event_id), "position": e.position}
            version -= 50
        return None

    async def _policies(self, tenant: str) -> dict[str, dict[str, Any]]:
        """Policy id → its title and runbook url, from the bundles activated (the tenant's win)."""
        out: dict[str, dict[str, Any]] = {}
        for stream in (
            stream_id_for(SHARED_TENANT, "policy", "bundle"),
            stream_id_for(tenant, "policy", "bundles-production"),
        ):
            for e in await self.store.read_stream(stream):
                if e.event_type == "policy.bundle_activated":
                    for p in e.payload.get("policies") or []:
                        out[str(p.get("policy_id"))] = dict(p)
        return out

    async def _incident_debrief(self, tenant: str, incident_id: str, as_of: int) -> dict[str, Any]:
        stream = stream_id_for(tenant, "incident", incident_id)
        own = await self.store.read_history(tenant, [stream], up_to_position=as_of)
        opened = next((e for e in own if e.event_type == "incident.opened"), None)
        if opened is None:
            raise NotFound(f"incident {incident_id} not found")
        run_id = str(opened.payload.get("run_id"))
        history = await read_run_history(self.store, tenant, run_id, at_position=as_of)
        return incident_debrief(incident_id, history, await self._policies(tenant))

    # --- documents ------------------------------------------------------------------------------

    async def _document(
        self,
        build: Callable[[int, datetime], Awaitable[Document]],
        fixed: tuple[int, datetime] | None = None,
    ) -> dict[str, Any]:
        """The document ``build`` makes, pinned to a position and a time (``fixed``, else the
        store's head and now), as one answer."""
        pin = fixed or (await self.store.head_position(), datetime.now(UTC).replace(microsecond=0))
        body, meta = await build(*pin)
        return {
            "content_type": meta["content_type"],
            "filename": meta["filename"],
            "size": len(body),
            "sha256": sha256_hex(body),
            "body_b64": base64.b64encode(body).decode(),
            "signature": meta["signature"],
            "pin": {"as_of_position": pin[0], "generated_at": pin[1].isoformat()},
        }

    async def _signed(
        self, fmt: str, doc: dict[str, Any], render_other: Callable[[], bytes], meta: dict[str, Any]
    ) -> tuple[bytes, dict[str, Any]]:
        if fmt == "json":
            body = signed_json(self.key, doc, meta)
            statement = orjson.loads(body)["signature"]
        else:

            def locked() -> bytes:
                with _RENDER_LOCK:
                    return render_other()

            body = await asyncio.to_thread(locked)
            statement = sign_statement(self.key, body, meta)
        return body, statement

    def _soc2(
        self, tenant: str, period: Period, fmt: str, progress: Read | None = None
    ) -> Callable[[int, datetime], Awaitable[Document]]:
        """How the SOC2 evidence of ``period`` is built at a pin (position, time)."""

        async def build(as_of: int, at: datetime) -> Document:
            checkpoint = await self.checkpoint(as_of)
            events = await self.period_events(period, as_of, progress)
            doc = soc2_evidence(
                events, period, generated_at=at, as_of_position=as_of, checkpoint=checkpoint
            )
            meta = {
                "document": "soc2-evidence",
                "format": fmt,
                "tenant_id": tenant,
                "period": doc["period"],
                "generated_at": doc["generated_at"],
                "as_of_position": as_of,
                "checkpoint": checkpoint,
            }

            def other() -> bytes:
                if fmt == "csv":
                    return evidence_csv(doc).encode()
                return render(evidence_report(doc), "pdf")

            body, statement = await self._signed(fmt, doc, other, meta)
            stamp = f"{period.start:%Y%m%d}-{period.end:%Y%m%d}"
            return body, {
                "content_type": CONTENT_TYPES[fmt],
                "filename": f"soc2-evidence-{tenant}-{stamp}.{fmt}",
                "signature": statement,
            }

        return build

    async def evidence_soc2(self, p: Params) -> dict[str, Any]:
        """The signed SOC2 evidence of a period."""
        tenant = _tenant(p)
        period = parse_period(tenant, p)
        fmt = _choice(p, "format", SOC2_FORMATS)
        return await self._document(self._soc2(tenant, period, fmt))

    # --- SOC2 evidence as a job -----------------------------------------------------------------

    def attach_jobs(self, jobs: ExportJobs) -> None:
        """Build SOC2 evidence jobs with the export jobs' machinery (their table, parts,
        progress and take-over)."""
        self.jobs = jobs
        jobs.register(SOC2_JOB, self._build_soc2_job)

    def _jobs(self) -> ExportJobs:
        if self.jobs is None:
            raise PermanentError("evidence jobs are not running in this process")
        return self.jobs

    async def evidence_soc2_job_create(self, p: Params) -> dict[str, Any]:
        """Start building a period's SOC2 evidence in the background, pinned now (the store's
        head and the time); the job (``queued``)."""
        tenant = _tenant(p)
        period = parse_period(tenant, p)
        fmt = _choice(p, "format", SOC2_FORMATS)
        actor = _text(p, "requested_by") or "unknown"
        as_of = await self.store.head_position()
        at = datetime.now(UTC).replace(microsecond=0)
        params = {
            "from": period.start.isoformat(),
            "to": period.end.isoformat(),
            "format": fmt,
            "as_of_position": as_of,
            "generated_at": at.isoformat(),
        }
        total = await self.store.count_occurred(
            tenant, period.start, period.end, up_to_position=as_of
        )
        subject = f"{params['from']}/{params['to']}"
        row = await self._jobs().insert(tenant, SOC2_JOB, subject, actor, total, params)
        return evidence_job_view(row)

    async def evidence_soc2_job(self, p: Params) -> dict[str, Any]:
        """One SOC2 evidence job: status and progress (events read of the total)."""
        job_id = _text(p, "job_id", required=True)
        assert job_id is not None
        return evidence_job_view(await self._jobs().row(_tenant(p), job_id, (SOC2_JOB,)))

    async def evidence_soc2_job_part(self, p: Params) -> dict[str, Any]:
        """One part of a done job's document (base64) with the document's type, name, sha256
        and signature statement."""
        job_id = _text(p, "job_id", required=True)
        assert job_id is not None
        seq = p.get("seq", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidInput("seq must be a part number (0 or more)")
        data, nxt, result = await self._jobs().raw_part(_tenant(p), job_id, seq, (SOC2_JOB,))
        return {
            "seq": seq,
            "data_b64": base64.b64encode(data).decode(),
            "next": nxt,
            "document": result,
        }

    async def _build_soc2_job(
        self, row: dict[str, Any], emit: Emit, progress: JobProgress
    ) -> dict[str, Any]:
        tenant, params, total = row["tenant_id"], row["params"], int(row["total"])
        period = parse_period(tenant, params)
        read = 0

        async def events_read(done: int) -> None:
            nonlocal read
            read = done
            await progress(done, total)

        build = self._soc2(tenant, period, _choice(params, "format", SOC2_FORMATS), events_read)
        # Pinned when the job was created: a job built again makes the same bytes.
        pin = (int(params["as_of_position"]), parse_instant(params, "generated_at"))
        answer = await self._document(build, fixed=pin)
        body = base64.b64decode(answer.pop("body_b64"))
        for start in range(0, len(body), PART_BYTES):
            await emit(body[start : start + PART_BYTES])
        checkpoint = answer["signature"].get("checkpoint") or {}
        return {
            "done": read,
            "total": max(total, read),
            "checkpoint_seq": checkpoint.get("seq"),
            "result": answer,
        }

    async def debrief(self, p: Params) -> dict[str, Any]:
        """One incident's executive debrief."""
        tenant = _tenant(p)
        incident_id = _text(p, "incident_id", required=True)
        assert incident_id is not None
        fmt = _choice(p, "format", DEBRIEF_FORMATS)

        async def build(as_of: int, at: datetime) -> Document:
            d = await self._incident_debrief(tenant, incident_id, as_of)
            d["generated_at"] = at.isoformat()
            meta = {
                "document": "incident-debrief",
                "format": fmt,
                "tenant_id": tenant,
                "incident_id": incident_id,
                "generated_at": at.isoformat(),
                "as_of_position": as_of,
                "checkpoint": await self.checkpoint(as_of),
            }
            body, statement = await self._signed(
                fmt, d, lambda: render(debrief_report(d), fmt), meta
            )
            return body, {
                "content_type": CONTENT_TYPES[fmt],
                "filename": f"debrief-{incident_id}.{fmt}",
                "signature": statement,
            }

        return await self._document(build)

    async def debriefs(self, p: Params) -> dict[str, Any]:
        """The debrief of every incident opened in a period (the first 100)."""
        tenant = _tenant(p)
        period = parse_period(tenant, p)
        fmt = _choice(p, "format", DEBRIEF_FORMATS)

        async def build(as_of: int, at: datetime) -> Document:
            events = await self.tenant_events(tenant, as_of)
            ids = [
                str(e.payload.get("incident_id"))
                for e in sorted(events, key=lambda e: e.position or 0)
                if e.event_type == "incident.opened" and e.tenant_id == tenant and period.holds(e)
            ][:MAX_DEBRIEFS]
            items = [await self._incident_debrief(tenant, i, as_of) for i in ids]
            start, end = period.start.isoformat(), period.end.isoformat()
            doc = {
                "document": "period-debrief",
                "tenant_id": tenant,
                "period": {"from": start, "to": end},
                "generated_at": at.isoformat(),
                "incidents": items,
            }
            meta = {
                "document": "period-debrief",
                "format": fmt,
                "tenant_id": tenant,
                "period": doc["period"],
                "generated_at": at.isoformat(),
                "as_of_position": as_of,
                "checkpoint": await self.checkpoint(as_of),
            }
            body, statement = await self._signed(
                fmt,
                doc,
                lambda: render(period_debrief_report(tenant, start, end, items), fmt),
                meta,
            )
            stamp = f"{period.start:%Y%m%d}-{period.end:%Y%m%d}"
            return body, {
                "content_type": CONTENT_TYPES[fmt],
                "filename": f"debriefs-{tenant}-{stamp}.{fmt}",
                "signature": statement,
            }

        return await self._document(build)

    # --- attestations ---------------------------------------------------------------------------

    async def _history(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's attestations, oldest first (their records)."""
        envs = await self.store.read_history(tenant, [attestation_stream(tenant)])
        return [attestation_record(e) for e in envs if e.event_type == ATTESTATION_EVENT]

    async def _attestation_files(
        self,
        tenant: str,
        period: Period,
        standard: str,
        attestation_id: str,
        as_of: int,
        at: datetime,
        history: list[dict[str, Any]],
    ) -> dict[str, Document]:
        """The attestation's JSON and PDF files, signed."""
        checkpoint = await self.checkpoint(as_of)
        events = await self.tenant_events(tenant, as_of)
        doc = attestation(
            events,
            period,
            standard=standard,
            attestation_id=attestation_id,
            generated_at=at,
            as_of_position=as_of,
            checkpoint=checkpoint,
            history=history,
        )
        out: dict[str, Document] = {}
        for fmt in ATTESTATION_FORMATS:
            meta = {
                "document": "compliance-attestation",
                "format": fmt,
                "standard": standard,
                "attestation_id": attestation_id,
                "tenant_id": tenant,
                "period": doc["period"],
                "generated_at": doc["generated_at"],
                "as_of_position": as_of,
                "checkpoint": checkpoint,
            }
            body, statement = await self._signed(
                fmt, doc, lambda: render(attestation_report(doc), "pdf"), meta
            )
            out[fmt] = (
                body,
                {
                    "content_type": CONTENT_TYPES[fmt],
                    "filename": f"attestation-{standard}-{attestation_id}.{fmt}",
                    "signature": statement,
                },
            )
        return out

    async def attest(self, p: Params) -> dict[str, Any]:
        """Generate an attestation of a period and record it (``evidence.attestation_generated``);
        answer its record."""
        tenant = _tenant(p)
        period = parse_period(tenant, p)
        standard = _choice(p, "standard", STANDARDS)
        actor = _text(p, "actor", required=True)
        assert actor is not None
        attestation_id = str(new_uuid7())
        as_of = await self.store.head_position()
        at = datetime.now(UTC).replace(microsecond=0)
        history = await self._history(tenant)
        files = await self._attestation_files(
            tenant, period, standard, attestation_id, as_of, at, history
        )
        statement = files["json"][1]["signature"]
        checkpoint = statement.get("checkpoint") or {}
        event = AttestationGenerated(
            attestation_id=attestation_id,
            standard=standard,
            period_from=period.start,
            period_to=period.end,
            as_of_position=as_of,
            generated_at=at,
            json_sha256=sha256_hex(files["json"][0]),
            pdf_sha256=sha256_hex(files["pdf"][0]),
            key_id=statement["key_id"],
            checkpoint_seq=checkpoint.get("seq"),
            requested_by=actor,
        )
        stream = attestation_stream(tenant)
        env = envelope_for(
            event, tenant_id=tenant, stream_id=stream, correlation_id=attestation_id, actor=actor
        )
        [stored] = await self.store.append(stream, [env])
        return attestation_record(stored)

    async def attestations(self, p: Params) -> dict[str, Any]:
        """The tenant's attestation history, newest first."""
        return {"attestations": list(reversed(await self._history(_tenant(p))))}

    async def attestation(self, p: Params) -> dict[str, Any]:
        """One recorded attestation's file, generated again from its pin; a file
        that does not come out with the recorded hash answers ``conflict``."""
        tenant = _tenant(p)
        attestation_id = _text(p, "attestation_id", required=True)
        fmt = _choice(p, "format", ATTESTATION_FORMATS)
        history = await self._history(tenant)
        index = next(
            (i for i, h in enumerate(history) if h["attestation_id"] == attestation_id), None
        )
        if index is None:
            raise NotFound(f"attestation {attestation_id} not found")
        record = history[index]
        pin = (record["as_of_position"], parse_instant(record, "generated_at"))
        period = parse_period(tenant, {"from": record["period_from"], "to": record["period_to"]})

        async def build(as_of: int, at: datetime) -> Document:
            files = await self._attestation_files(
                tenant,
                period,
                record["standard"],
                record["attestation_id"],
                as_of,
                at,
                history[:index],
            )
            body, meta = files[fmt]
            if sha256_hex(body) != record[f"{fmt}_sha256"]:
                raise Conflict(
                    f"attestation {attestation_id} no longer regenerates to its recorded "
                    f"{fmt} sha256 (the log it read was changed)"
                )
            return body, meta

        return await self._document(build, fixed=pin)


def attestation_stream(tenant: str) -> str:
    """The stream of a tenant's attestation records."""
    return stream_id_for(tenant, ATTESTATION_CATEGORY, "history")


def attestation_record(env: EventEnvelope) -> dict[str, Any]:
    """An ``evidence.attestation_generated`` event as a history entry."""
    p = env.payload
    return {
        "attestation_id": p["attestation_id"],
        "standard": p["standard"],
        "period_from": p["period_from"],
        "period_to": p["period_to"],
        "as_of_position": p["as_of_position"],
        "generated_at": p["generated_at"],
        "json_sha256": p["json_sha256"],
        "pdf_sha256": p["pdf_sha256"],
        "key_id": p["key_id"],
        "checkpoint_seq": p.get("checkpoint_seq"),
        "requested_by": p["requested_by"],
        "event_id": str(env.event_id),
    }


def evidence_job_view(row: dict[str, Any]) -> dict[str, Any]:
    """An evidence job as the API shows it."""
    params, result = row["params"] or {}, row["result"] or {}
    return {
        "job_id": row["job_id"],
        "status": row["status"],
        "period": {"from": params.get("from"), "to": params.get("to")},
        "format": params.get("format"),
        "as_of_position": params.get("as_of_position"),
        "requested_by": row["requested_by"],
        "progress": {"done": int(row["done"]), "total": int(row["total"])},
        "bytes": int(row["bytes"]),
        "attempts": int(row["attempts"]),
        "filename": result.get("filename"),
        "sha256": result.get("sha256"),
        "error": row["error"],
        "created_at": row["created_at"].astimezone(UTC).isoformat(),
        "updated_at": row["updated_at"].astimezone(UTC).isoformat(),
    }
