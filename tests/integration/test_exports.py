"""Full exports against real PostgreSQL, NATS and chDB: events with hashes and the proof up to a
signed checkpoint, at once and as jobs, larger than a NATS message, checked offline and tampered."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row
from typer.testing import CliRunner

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    ExecutionFailed,
    ExecutionStarted,
    StepAttemptBlocked,
    StepAttemptCompleted,
    StepDispatched,
)
from libs.errors import Conflict, InvalidInput, NotFound, TooLarge
from libs.eventbus.anchor import Anchorer
from libs.eventbus.db import transaction
from libs.eventbus.export import verify_export
from libs.runtime.cli import app
from services.audit_replay.exports import MAX_ATTEMPTS
from tests.conftest import wait_until
from tests.contract.eventstore import step
from tests.integration.test_projections import Audit, audit
from tests.unit.test_audit_domain import bundle_event, flow

pytestmark = pytest.mark.integration

__all__ = ["audit"]

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


async def _checkpoint(a: Audit, url: str, key: Ed25519PrivateKey) -> int:
    anchorer = Anchorer(url, a.store, key, 60.0)
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        event = await anchorer.checkpoint_once(conn, force=True)
    assert event is not None
    return event.seq


def _lines(body: str | bytes) -> list[bytes]:
    data = body.encode() if isinstance(body, str) else body
    return [x + b"\n" for x in data.split(b"\n") if x]


async def _job(a: Audit, tenant: str, kind: str, subject: str) -> tuple[dict[str, Any], bytes]:
    job = await a.call("export_job_create", tenant, subject_type=kind, subject_id=subject)
    assert job["status"] == "queued"

    async def finished() -> bool:
        nonlocal job
        job = await a.call("export_job", tenant, job_id=job["job_id"])
        return job["status"] in ("done", "failed")

    await wait_until(finished, timeout=60, what="the export job to finish")
    assert job["status"] == "done", job
    data, seq = bytearray(), 0
    while seq is not None:
        part = await a.call("export_job_part", tenant, job_id=job["job_id"], seq=seq)
        data += part["data"].encode()
        seq = part["next"]
    return job, bytes(data)


async def test_a_run_exports_with_its_proof_inline_and_as_a_job_for_its_tenant_only(
    audit: Audit, unique: Any, own_system: Any, tmp_path: Path
) -> None:
    tenant, other, run = unique("acme"), unique("globex"), unique("run")
    key = Ed25519PrivateKey.generate()
    await audit.append([bundle_event(), *flow(tenant, run)])
    seq = await _checkpoint(audit, own_system.service_url, key)
    # After the checkpoint: one more event on the run's stream, proved by the chain only.
    await audit.append([step(tenant, run, 9)])

    inline = await audit.call("export_events", tenant, subject_type="run", subject_id=run)
    assert inline["content_type"] == "application/x-ndjson"
    lines = _lines(inline["body"])
    report = verify_export(lines, key.public_key())
    assert report.ok, report.findings
    header = orjson.loads(lines[0])
    # flow() writes the run, decisions, cost and incident streams.
    assert len(header["streams"]) == 4
    assert report.anchored_streams == 4
    assert report.checkpoint_seq == seq
    assert report.events == len(flow(tenant, run)) + 1

    job, data = await _job(audit, tenant, "run", run)
    assert job["progress"] == {"done": report.events, "total": report.events}
    assert job["checkpoint_seq"] == seq
    assert verify_export(_lines(data), key.public_key()).ok

    # mctl verify-export: 0 on the file, 1 naming the edit on a tampered copy.
    pub = tmp_path / "signing.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    good, bad = tmp_path / "run.ndjson", tmp_path / "tampered.ndjson"
    good.write_bytes(data)
    bad.write_bytes(data.replace(b'"outcome":"deny"', b'"outcome":"allow"', 1))
    assert bad.read_bytes() != data
    runner = CliRunner()
    ok = runner.invoke(app, ["verify-export", str(good), "--public-key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert "ok:" in ok.output
    broken = runner.invoke(app, ["verify-export", str(bad), "--public-key", str(pub)])
    assert broken.exit_code == 1
    assert "edited_event" in broken.output
    wrong = tmp_path / "other.pub"
    wrong.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    forged = runner.invoke(app, ["verify-export", str(good), "--public-key", str(wrong)])
    assert forged.exit_code == 1
    assert "checkpoint_signature" in forged.output

    # Another tenant sees neither the run nor the job; bad input is named.
    with pytest.raises(NotFound):
        await audit.call("export_events", other, subject_type="run", subject_id=run)
    with pytest.raises(NotFound):
        await audit.call("export_job", other, job_id=job["job_id"])
    with pytest.raises(NotFound, match="not found"):
        await audit.call("export_job_part", other, job_id=job["job_id"], seq=0)
    assert (await audit.call("export_jobs", other))["jobs"] == []
    assert [j["job_id"] for j in (await audit.call("export_jobs", tenant))["jobs"]] == [
        job["job_id"]
    ]
    with pytest.raises(InvalidInput, match="subject_type"):
        await audit.call("export_events", tenant, subject_type="tenant", subject_id=run)
    with pytest.raises(NotFound, match=f"has {job['parts']} parts, no part {job['parts']}"):
        await audit.call("export_job_part", tenant, job_id=job["job_id"], seq=job["parts"])


async def test_an_export_larger_than_a_nats_message_comes_whole(
    audit: Audit, unique: Any, own_system: Any
) -> None:
    tenant, run = unique("acme"), unique("big")
    key = Ed25519PrivateKey.generate()
    blob = "x" * 700_000
    n = audit.nc.max_payload // 700_000 + 4
    for i in range(1, n + 1):
        await audit.append([step(tenant, run, i, output=f"{i}:{blob}")])
    await _checkpoint(audit, own_system.service_url, key)

    inline = await audit.call("export_events", tenant, subject_type="run", subject_id=run)
    body = inline["body"].encode()
    assert len(body) > audit.nc.max_payload
    report = verify_export(_lines(body), key.public_key())
    assert report.ok, report.findings
    assert report.events == n
    # A caller that takes no answer in parts is told why instead of timing out.
    with pytest.raises(TooLarge):
        await audit.rpc.call(
            "audit",
            "export_events",
            {"tenant_id": tenant, "subject_type": "run", "subject_id": run},
            timeout=60,
            chunked=False,
        )

    job, data = await _job(audit, tenant, "run", run)
    assert job["parts"] > 1
    assert len(data) > audit.nc.max_payload
    assert verify_export(_lines(data), key.public_key()).ok


async def test_an_unfinished_job_is_built_again_or_fails_visibly_after_restarts(
    audit: Audit, unique: Any, own_system: Any
) -> None:
    tenant, run = unique("acme"), unique("run")
    await audit.append(flow(tenant, run))
    resumed, exhausted, stale = (f"00000000-0000-7000-8000-00000000000{c}" for c in "abc")
    async with transaction(audit.pool) as conn:
        for job_id, attempts, age in (
            (resumed, 1, "0 s"),
            (exhausted, MAX_ATTEMPTS, "0 s"),
            (stale, 1, "1 h"),
        ):
            # As a process that stopped while building it left it: running, partly written.
            await conn.execute(
                "INSERT INTO audit_replay.export_jobs (job_id, tenant_id, subject_type, "
                "subject_id, requested_by, status, attempts, done, total, heartbeat_at) "
                "VALUES (%s, %s, 'run', %s, 'test', 'running', %s, 3, 9, now() - %s::interval)",
                (job_id, tenant, run, attempts, age),
            )
            await conn.execute(
                "INSERT INTO audit_replay.export_parts (job_id, seq, data) VALUES (%s, 0, %s)",
                (job_id, b'{"kind":"header"}\n'),
            )
    with pytest.raises(Conflict, match="running"):
        await audit.call("export_job_part", tenant, job_id=resumed, seq=0)
    # A job whose heartbeat went stale is taken over by the running service ...
    queries = audit.service.queries
    assert queries is not None
    await queries.exports.take_over(timedelta(minutes=5))

    async def stale_done() -> bool:
        return (await audit.call("export_job", tenant, job_id=stale))["status"] == "done"

    await wait_until(stale_done, timeout=60, what="the stale job to be built again")
    assert (await audit.call("export_job", tenant, job_id=resumed))["status"] == "running"
    # ... and a restarted service takes over every unfinished job at once.
    await audit.service.stop()
    await audit.start_service()

    async def settled() -> bool:
        states = [
            (await audit.call("export_job", tenant, job_id=j))["status"]
            for j in (resumed, exhausted, stale)
        ]
        return all(s in ("done", "failed") for s in states)

    await wait_until(settled, timeout=60, what="the jobs to settle")
    for job_id in (resumed, stale):
        done = await audit.call("export_job", tenant, job_id=job_id)
        assert done["status"] == "done"
        assert done["attempts"] == 2
        assert done["progress"]["done"] == done["progress"]["total"] == len(flow(tenant, run))
        data, seq = bytearray(), 0
        while seq is not None:
            part = await audit.call("export_job_part", tenant, job_id=job_id, seq=seq)
            data += part["data"].encode()
            seq = part["next"]
        # Built again from the start: the part the stopped process wrote is gone.
        assert data.count(b'"kind":"header"') == 1
        assert _lines(bytes(data))[-1].startswith(b'{"kind":"end"')
    failed = await audit.call("export_job", tenant, job_id=exhausted)
    assert failed["status"] == "failed"
    assert f"interrupted {MAX_ATTEMPTS} times" in failed["error"]


def _exec_env(tenant: str, execution: str, event: DomainEvent) -> Any:
    return envelope_for(
        event,
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "execution", execution),
        correlation_id=f"corr-{execution}",
        actor="test",
    )


async def test_an_execution_replays_to_any_point_and_exports_with_its_runs(
    audit: Audit, unique: Any, own_system: Any
) -> None:
    tenant, execution = unique("acme"), unique("exe")
    run_a, run_b = unique("ra"), unique("rb")
    key = Ed25519PrivateKey.generate()
    common = {"execution_id": execution, "workflow_id": "wf"}
    dispatched = {**common, "agent_id": "agent-1", "risk_tier": "read_only"}
    events = [
        ExecutionStarted(
            **common, workflow_version=1, document_hash="h", document={}, started_at=T0
        ),
        StepDispatched(
            **dispatched,
            step_id="fetch",
            attempt=1,
            run_id=run_a,
            dispatched_at=T0,
            deadline_at=T0,
        ),
        StepAttemptCompleted(
            execution_id=execution, step_id="fetch", attempt=1, run_id=run_a, finished_at=T0
        ),
        StepDispatched(
            **dispatched,
            step_id="write",
            attempt=1,
            run_id=run_b,
            dispatched_at=T0,
            deadline_at=T0,
        ),
        StepAttemptBlocked(
            execution_id=execution,
            step_id="write",
            attempt=1,
            run_id=run_b,
            reason="policy no-shell",
            finished_at=T0,
        ),
        ExecutionFailed(execution_id=execution, step_id="write", reason="blocked", finished_at=T0),
    ]
    positions = [await audit.append([_exec_env(tenant, execution, e)]) for e in events]
    await audit.append([*flow(tenant, run_a), *flow(tenant, run_b)])
    await _checkpoint(audit, own_system.service_url, key)

    full = await audit.call("replay_execution", tenant, execution_id=execution)
    assert full["state"]["status"] == "failed"
    assert full["events_applied"] == len(events)
    turn = full["inflection_point"]
    assert (turn["kind"], turn["step_id"], turn["position"]) == ("blocked", "write", positions[4])
    steps = {s["step_id"]: s for s in full["state"]["steps"]}
    assert steps["fetch"]["status"] == "completed"
    assert steps["write"]["run_ids"] == [run_b]

    early = await audit.call("replay_execution", tenant, execution_id=execution, at_version=3)
    assert early["state"]["status"] == "running"
    assert early["inflection_point"] is None
    assert early["at_position"] == positions[2]
    assert early == await audit.call(
        "replay_execution", tenant, execution_id=execution, at_position=positions[2]
    )
    with pytest.raises(NotFound):
        await audit.call("replay_execution", unique("globex"), execution_id=execution)

    exported = await audit.call(
        "export_events", tenant, subject_type="execution", subject_id=execution
    )
    lines = _lines(exported["body"])
    report = verify_export(lines, key.public_key())
    assert report.ok, report.findings
    streams = orjson.loads(lines[0])["streams"]
    assert stream_id_for(tenant, "execution", execution) in streams
    assert {stream_id_for(tenant, "run", r) for r in (run_a, run_b)} <= set(streams)
    assert report.anchored_streams == len(streams) == 1 + 2 * 4
