"""SOC2 evidence and executive debriefs, read from a real event store by the running audit
service: figures equal to the events seeded, event ids that exist, signatures that verify and
fail on a tampered file, PDFs checked with poppler (``pdftotext``, ``pdftoppm``)."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    IncidentResolved,
    PolicyExceptionGranted,
    PromotionApproved,
    PromotionRequested,
    UserCreated,
    UserRoleGranted,
)
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.anchor import Anchorer
from libs.eventbus.db import transaction
from libs.evidence_signing import SIG_SUFFIX, verify_file
from services.audit_replay.domain.attestation import content_sha256
from tests.conftest import System, wait_until
from tests.integration.test_projections import Audit, audit
from tests.unit.test_audit_domain import POLICY, bundle_event, flow

pytestmark = pytest.mark.integration

__all__ = ["audit"]

NOW = datetime.now(UTC).replace(microsecond=0)
FROM, TO = (NOW - timedelta(hours=1)).isoformat(), (NOW + timedelta(hours=1)).isoformat()
CONTROLS = ("CC6.1", "CC6.2/6.3", "CC7.2", "CC7.3/7.4", "CC8.1")


def ev(tenant: str, event: DomainEvent, category: str, entity: str) -> EventEnvelope:
    return envelope_for(
        event,
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, category, entity),
        correlation_id="evidence-test",
        actor="user:auditor-test",
    )


def seeded(tenant: str, unique: Any) -> dict[str, list[EventEnvelope]]:
    """Two stopped runs (two denials, violations, incidents; one resolved), access changes, a
    promotion with its approval and an exception, in the period; one run before it."""
    runs = [unique("run-a"), unique("run-b")]
    stopped = [e for r in runs for e in flow(tenant, r)]
    resolved = ev(
        tenant,
        IncidentResolved(incident_id=f"{runs[0]}-i1", by="alice", resolution="limit raised"),
        "incident",
        f"{runs[0]}-i1",
    )
    access = [
        ev(tenant, UserCreated(user_id="bob"), "user", "bob"),
        ev(tenant, UserRoleGranted(user_id="bob", role="operator"), "user", "bob"),
        ev(tenant, UserRoleGranted(user_id="bob", role="viewer"), "user", "bob"),
        ev(tenant, ApiKeyIssued(key_id="k1", name="ci", scopes=["read"]), "api_key", "k1"),
        ev(tenant, ApiKeyRevoked(key_id="k1"), "api_key", "k1"),
    ]
    change = [
        ev(
            tenant,
            PromotionRequested(
                promotion_id="p1",
                agent_id="agent-1",
                agent_version=2,
                spec_hash="sha256:" + "a" * 64,
                agent_state="validated",
                environment="production",
                policy_digest="sha256:bundle1",
                policy_set_hash="sha256:" + "b" * 64,
                diff_hash="sha256:" + "c" * 64,
                requested_by="alice",
                tier="irreversible",
                rule={"required": 1},
                requested_at=NOW,
            ),
            "promotion",
            "p1",
        ),
        ev(
            tenant,
            PromotionApproved(
                promotion_id="p1", approver="carol", role="admin", reason="ok", approved_at=NOW
            ),
            "promotion",
            "p1",
        ),
        ev(
            tenant,
            PolicyExceptionGranted(
                exception_id="x1",
                policy_id=POLICY,
                agent_id="agent-1",
                reason="migration",
                granted_by="carol",
                expires_at=NOW + timedelta(days=1),
            ),
            "policy",
            "exceptions",
        ),
    ]
    before = [
        e.model_copy(update={"occurred_at": NOW - timedelta(days=3)})
        for e in flow(tenant, unique("run-old"))
    ]
    return {
        "stopped": stopped,
        "resolved": [resolved],
        "access": access,
        "change": change,
        "before": before,
    }


async def seed_store(
    audit: Audit, system: System, tenant: str, unique: Any
) -> dict[str, list[EventEnvelope]]:
    """The seeded events stored, with the shared bundle and a signed checkpoint after them."""
    seed = seeded(tenant, unique)
    await audit.append([bundle_event(), *(e for group in seed.values() for e in group)])
    await checkpoint(system, audit, Ed25519PrivateKey.generate())
    return seed


async def fetch(audit: Audit, method: str, tenant: str, **params: Any) -> tuple[bytes, Any]:
    """A whole document and its answer (size and sha256 checked)."""
    answer = await audit.call(method, tenant, **params)
    body = base64.b64decode(answer["body_b64"])
    assert len(body) == answer["size"]
    assert "sha256:" + hashlib.sha256(body).hexdigest() == answer["sha256"]
    return body, answer


async def checkpoint(system: System, audit: Audit, key: Ed25519PrivateKey) -> None:
    anchorer = Anchorer(system.service_url, audit.store, key, 60.0)
    async with await psycopg.AsyncConnection.connect(
        system.service_url, autocommit=True, row_factory=dict_row
    ) as conn:
        assert await anchorer.checkpoint_once(conn, force=True) is not None


def figures(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{c['control_id']} {f['name']}": f for c in doc["controls"] for f in c["figures"]}


def save(tmp: Path, name: str, body: bytes, statement: dict[str, Any] | None = None) -> Path:
    path = tmp / name
    path.write_bytes(body)
    if statement is not None:
        path.with_name(name + SIG_SUFFIX).write_bytes(orjson.dumps(statement))
    return path


def pdf_text(path: Path, *, layout: bool = True) -> str:
    """The PDF's text; with ``layout`` a table row stays on one line, without it a cell's
    wrapped lines follow each other."""
    args = ["pdftotext", *(["-layout"] if layout else []), str(path), "-"]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def pdf_pages(path: Path, tmp: Path) -> list[Path]:
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(path), str(tmp / "page")], check=True)
    pages = sorted(tmp.glob("page*.png"))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pages)
    return pages


async def test_soc2_evidence_counts_the_seeded_events_and_verifies(
    audit: Audit, own_system: System, unique: Any, tmp_path: Path
) -> None:
    tenant, other = unique("acme"), unique("other")
    seed = seeded(tenant, unique)
    await audit.append([bundle_event(), *(e for group in seed.values() for e in group)])
    await audit.append(flow(other, unique("run-x")))  # another tenant's: never counted
    anchor_key = Ed25519PrivateKey.generate()
    await checkpoint(own_system, audit, anchor_key)

    body, _ = await fetch(
        audit, "evidence_soc2", tenant, **{"from": FROM, "to": TO, "format": "json"}
    )
    path = save(tmp_path, "evidence.json", body)
    statement, problems = verify_file(path, anchor_key=anchor_key.public_key())
    assert problems == []
    assert statement["checkpoint"]["merkle_root"]
    doc = orjson.loads(body)["evidence"]
    assert [c["control_id"] for c in doc["controls"]] == list(CONTROLS)
    f = figures(doc)
    expected = {
        "CC6.1 decisions": 6,  # 3 decisions in each of the 2 runs of the period
        "CC6.1 denials": 2,
        f"CC6.1 denials:{POLICY}": 2,
        "CC6.1 api_keys_issued": 1,
        "CC6.2/6.3 users_created": 1,
        "CC6.2/6.3 roles_granted": 2,
        "CC6.2/6.3 api_keys_revoked": 1,
        "CC7.2 violations": 2,
        "CC7.3/7.4 incidents_opened": 2,
        "CC7.3/7.4 incidents_resolved": 1,
        "CC7.3/7.4 incidents_unresolved": 1,
        "CC7.3/7.4 incidents:high": 2,
        "CC8.1 bundles_activated": 1,
        "CC8.1 promotions_requested": 1,
        "CC8.1 promotions_approved": 1,
        "CC8.1 exceptions_granted": 1,
    }
    assert {k: f[k]["value"] for k in expected} == expected
    stored_ids = {str(e.event_id) for e in await audit.store.read_all(0, 10_000)}
    for k in expected:
        ids = f[k]["event_ids"]
        assert len(ids) == len(set(ids)) and set(ids) <= stored_ids, k
    before = {str(e.event_id) for e in seed["before"]}
    assert not before & {i for fig in f.values() for i in fig["event_ids"]}

    # A tampered file fails, naming the change.
    tampered = orjson.loads(body)
    tampered["evidence"]["controls"][0]["figures"][1]["value"] = 0
    bad = save(tmp_path, "tampered.json", orjson.dumps(tampered))
    _, problems = verify_file(bad)
    assert any("modified" in p for p in problems)

    # CSV: one row per figure, with its event ids.
    csv_body, csv_first = await fetch(
        audit, "evidence_soc2", tenant, **{"from": FROM, "to": TO, "format": "csv"}
    )
    csv_path = save(tmp_path, "evidence.csv", csv_body, csv_first["signature"])
    assert verify_file(csv_path)[1] == []
    assert re.search(
        rf"^CC6\.1,figure,denials,2,,{f['CC6.1 denials']['event_ids'][0]};", csv_body.decode(), re.M
    )


async def test_soc2_evidence_pdf_has_every_control_and_the_figures(
    audit: Audit, own_system: System, unique: Any, tmp_path: Path
) -> None:
    tenant = unique("acme")
    await seed_store(audit, own_system, tenant, unique)
    body, first = await fetch(
        audit, "evidence_soc2", tenant, **{"from": FROM, "to": TO, "format": "pdf"}
    )
    assert body.startswith(b"%PDF-")
    assert first["content_type"] == "application/pdf"
    path = save(tmp_path, "evidence.pdf", body, first["signature"])
    assert verify_file(path)[1] == []
    text = pdf_text(path)
    for heading in (
        "CC6.1 Logical access",
        "CC6.2/6.3 Access changes",
        "CC7.2 Monitoring",
        "CC7.3/7.4 Incident response",
        "CC8.1 Change management",
        "Integrity",
        "Appendix: event ids",
    ):
        assert heading in text, heading
    for label, value in (
        ("Denials", 2),
        ("Roles granted", 2),
        ("Incidents opened", 2),
        ("Incidents resolved", 1),
        ("Promotion approvals", 1),
        ("Policy exceptions granted", 1),
    ):
        assert re.search(rf"^\s*{label}\s+{value}\s*$", text, re.M), label
    assert f"Tenant: {tenant}" in text
    assert len(pdf_pages(path, tmp_path)) >= 2
    # One byte changed in the PDF: the signature no longer holds.
    tampered = bytearray(body)
    tampered[len(tampered) // 2] ^= 1
    bad = save(tmp_path, "bad.pdf", bytes(tampered), first["signature"])
    assert any("modified" in p for p in verify_file(bad)[1])


async def test_incident_debrief_tells_what_happened_impact_and_actions(
    audit: Audit, unique: Any, tmp_path: Path
) -> None:
    tenant = unique("acme")
    seed = seeded(tenant, unique)
    await audit.append([bundle_event(), *(e for group in seed.values() for e in group)])
    incident = seed["stopped"][-1].payload["incident_id"]  # the second run's, still open
    body, _ = await fetch(audit, "debrief", tenant, incident_id=incident, format="json")
    d = orjson.loads(body)["evidence"]
    assert d["inflection_point"]["step_index"] == 3
    assert d["impact"]["runs_stopped"] == 1
    assert d["impact"]["cost_spent_usd"] == "0.00075"
    assert d["impact"]["time_to_detect_s"] is not None and d["impact"]["time_to_stop_s"] >= 0
    assert d["impact"]["time_to_resolve_s"] is None and d["status"] == "open"
    assert len(d["timeline"]) == len(flow(tenant, "x")) and d["recommended_actions"][0]["action"]

    md, _ = await fetch(audit, "debrief", tenant, incident_id=incident, format="md")
    text = md.decode()
    for part in ("what happened", "impact", "recommended actions", "Runs stopped:** 1"):
        assert part in text, part
    html, _ = await fetch(audit, "debrief", tenant, incident_id=incident, format="html")
    assert b"<h2>Incident" in html and b"<script" not in html
    pdf, pfirst = await fetch(audit, "debrief", tenant, incident_id=incident, format="pdf")
    path = save(tmp_path, "debrief.pdf", pdf, pfirst["signature"])
    assert verify_file(path)[1] == []
    ptext = pdf_text(path)
    assert "recommended actions" in ptext and re.search(r"Runs stopped\s+1", ptext)
    assert pdf_pages(path, tmp_path)

    # The period's debrief holds both incidents of the period, not the older one.
    period, _ = await fetch(audit, "debriefs", tenant, **{"from": FROM, "to": TO, "format": "json"})
    ids = [i["incident_id"] for i in orjson.loads(period)["evidence"]["incidents"]]
    assert ids == [e.payload["incident_id"] for e in seed["stopped"] if "incident_id" in e.payload]


async def test_bad_requests_are_named(audit: Audit, unique: Any) -> None:
    tenant = unique("acme")
    cases = [
        ("evidence_soc2", {"from": TO, "to": FROM, "format": "pdf"}, "period is empty"),
        ("evidence_soc2", {"from": "yesterday", "to": TO, "format": "pdf"}, "ISO 8601"),
        ("evidence_soc2", {"from": "2026-01-01T00:00:00", "to": TO, "format": "pdf"}, "time zone"),
        ("evidence_soc2", {"from": FROM, "to": TO, "format": "docx"}, "format must be"),
        ("debrief", {"incident_id": "i", "format": "txt"}, "format must be"),
        ("debriefs", {"from": "2020-01-01T00:00:00Z", "to": TO, "format": "md"}, "longer than"),
    ]
    for method, params, message in cases:
        with pytest.raises(InvalidInput, match=message):
            await audit.call(method, tenant, **params)
    with pytest.raises(NotFound, match="incident nope not found"):
        await audit.call("debrief", tenant, incident_id="nope", format="md")


async def test_attestations_are_recorded_listed_and_regenerate_to_their_hashes(
    audit: Audit, own_system: System, unique: Any, tmp_path: Path
) -> None:
    tenant = unique("acme")
    await seed_store(audit, own_system, tenant, unique)
    period = {"from": FROM, "to": TO}
    first = await audit.call("attest", tenant, standard="soc2", actor="user:carol", **period)
    second = await audit.call("attest", tenant, standard="iso27001", actor="user:carol", **period)
    listed = (await audit.call("attestations", tenant))["attestations"]
    assert [a["attestation_id"] for a in listed] == [
        second["attestation_id"],
        first["attestation_id"],
    ]
    recorded = [
        e
        for e in await audit.store.read_all(0, 10_000)
        if e.event_type == "evidence.attestation_generated" and e.tenant_id == tenant
    ]
    assert [str(e.event_id) for e in recorded] == [first["event_id"], second["event_id"]]

    body, answer = await fetch(
        audit, "attestation", tenant, attestation_id=second["attestation_id"], format="json"
    )
    assert answer["sha256"] == second["json_sha256"]
    path = save(tmp_path, "attestation.json", body)
    assert verify_file(path)[1] == []
    doc = orjson.loads(body)["evidence"]
    assert doc["standard"] == "iso27001"
    assert [h["attestation_id"] for h in doc["history"]] == [first["attestation_id"]]
    assert doc["enforcement"]["denials"] == 2
    stored = {str(e.event_id): e for e in await audit.store.read_all(0, 10_000)}
    for p in doc["enforcement"]["proofs"]:
        assert p["content_sha256"] == content_sha256(stored[p["event_id"]])
    [promotion] = doc["promotions"]
    assert promotion["request"]["diff_hash"] == "sha256:" + "c" * 64
    assert [a["approver"] for a in promotion["approvals"]] == ["carol"]
    [exception] = doc["exceptions"]
    assert exception["granted"]["expires_at"] and exception["ended"] is None
    assert [b["bundle_digest"] for b in doc["policy_bundles"]] == ["sha256:bundle1"]

    pdf, pdf_answer = await fetch(
        audit, "attestation", tenant, attestation_id=second["attestation_id"], format="pdf"
    )
    assert pdf_answer["sha256"] == second["pdf_sha256"]
    pdf_path = save(tmp_path, "attestation.pdf", pdf, pdf_answer["signature"])
    assert verify_file(pdf_path)[1] == []
    text = pdf_text(pdf_path)
    flat = " ".join(text.split())  # long headings wrap
    for heading in (
        "Compliance attestation: ISO/IEC 27001:2022",
        "A.8.32 Change management: policy digests and signatures",
        "approvals and diffs",
        "exceptions and expiry",
        "freeze history",
        "proofs of enforcement",
        "Attestation history",
    ):
        assert heading in flat, heading
    cells = "".join(pdf_text(pdf_path, layout=False).split())  # a table cell wraps the id
    assert first["attestation_id"] in cells
    assert re.search(r"Denials enforced\s+2", text)
    with pytest.raises(NotFound):
        await audit.call("attestation", tenant, attestation_id="nope", format="pdf")
    with pytest.raises(InvalidInput, match="standard must be one of"):
        await audit.call("attest", tenant, standard="pci", actor="user:carol", **period)


async def _evidence_job(audit: Audit, tenant: str, job_id: str) -> tuple[dict[str, Any], bytes]:
    """Wait for an evidence job to finish; its view and its downloaded document."""
    job: dict[str, Any] = {}

    async def finished() -> bool:
        nonlocal job
        job = await audit.call("evidence_soc2_job", tenant, job_id=job_id)
        return job["status"] in ("done", "failed")

    await wait_until(finished, timeout=60, what="the evidence job to finish")
    assert job["status"] == "done", job
    data, seq = bytearray(), 0
    while seq is not None:
        part = await audit.call("evidence_soc2_job_part", tenant, job_id=job_id, seq=seq)
        data += base64.b64decode(part["data_b64"])
        seq = part["next"]
    assert part["document"]["sha256"] == job["sha256"]
    return job, bytes(data)


def _without_generation_time(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(body)["evidence"]
    doc.pop("generated_at")
    return doc


async def test_soc2_evidence_as_a_job_is_the_document_the_request_answers(
    audit: Audit, own_system: System, unique: Any, tmp_path: Path
) -> None:
    tenant, other = unique("acme"), unique("other")
    await seed_store(audit, own_system, tenant, unique)
    period = {"from": FROM, "to": TO}
    job = await audit.call(
        "evidence_soc2_job_create", tenant, format="json", requested_by="user:carol", **period
    )
    assert job["status"] == "queued"
    assert job["requested_by"] == "user:carol"
    # The period's events are read (not the one before it), and counted as they are.
    start, end = datetime.fromisoformat(FROM), datetime.fromisoformat(TO)
    tenant_events = len(
        [
            e
            for e in await audit.store.read_all(0, 10_000, tenant_id=tenant)
            if start <= e.occurred_at < end
        ]
    )
    assert 0 < tenant_events < len(await audit.store.read_all(0, 10_000, tenant_id=tenant))
    assert job["progress"] == {"done": 0, "total": tenant_events}

    done, body = await _evidence_job(audit, tenant, job["job_id"])
    # Every event the document is made from was read and counted.
    assert done["progress"] == {"done": tenant_events, "total": tenant_events}
    assert done["bytes"] == len(body)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == done["sha256"]
    assert done["filename"].startswith(f"soc2-evidence-{tenant}-")
    path = save(tmp_path, "job.json", body)
    statement, problems = verify_file(path)
    assert problems == []
    assert statement["as_of_position"] == job["as_of_position"]
    sync, _ = await fetch(audit, "evidence_soc2", tenant, format="json", **period)
    assert _without_generation_time(body) == _without_generation_time(sync)

    # The job is its tenant's alone, and not an export job.
    with pytest.raises(NotFound, match="not found"):
        await audit.call("evidence_soc2_job", other, job_id=job["job_id"])
    with pytest.raises(NotFound, match="not found"):
        await audit.call("evidence_soc2_job_part", other, job_id=job["job_id"], seq=0)
    with pytest.raises(NotFound, match="not found"):
        await audit.call("export_job", tenant, job_id=job["job_id"])
    assert await audit.call("export_jobs", tenant) == {"jobs": []}
    with pytest.raises(InvalidInput, match="period is empty"):
        await audit.call(
            "evidence_soc2_job_create", tenant, format="pdf", **{"from": TO, "to": FROM}
        )
    with pytest.raises(InvalidInput, match="format must be"):
        await audit.call("evidence_soc2_job_create", tenant, format="docx", **period)


async def test_an_unfinished_evidence_job_is_built_again_after_a_restart(
    audit: Audit, own_system: System, unique: Any, tmp_path: Path
) -> None:
    tenant = unique("acme")
    await seed_store(audit, own_system, tenant, unique)
    job_id = "00000000-0000-7000-8000-0000000000ee"
    as_of = await audit.store.head_position()
    params = {
        "from": FROM,
        "to": TO,
        "format": "pdf",
        "as_of_position": as_of,
        "generated_at": NOW.isoformat(),
    }
    async with transaction(audit.pool) as conn:
        # As a process that stopped while building it left it: running, partly written.
        await conn.execute(
            "INSERT INTO audit_replay.export_jobs (job_id, tenant_id, subject_type, subject_id, "
            "requested_by, status, attempts, done, total, params) "
            "VALUES (%s, %s, 'evidence_soc2', 'period', 'test', 'running', 1, 3, 9, %s)",
            (job_id, tenant, Jsonb(params)),
        )
        await conn.execute(
            "INSERT INTO audit_replay.export_parts (job_id, seq, data) VALUES (%s, 0, %s)",
            (job_id, b"half a document"),
        )
    with pytest.raises(Conflict, match="running"):
        await audit.call("evidence_soc2_job_part", tenant, job_id=job_id, seq=0)
    await audit.service.stop()
    await audit.start_service()

    done, body = await _evidence_job(audit, tenant, job_id)
    assert done["attempts"] == 2
    # Built again from the start at its pin: a whole signed PDF, generated when recorded.
    assert body.startswith(b"%PDF-") and b"half a document" not in body
    path = save(tmp_path, done["filename"], body)
    part = await audit.call("evidence_soc2_job_part", tenant, job_id=job_id, seq=0)
    statement = part["document"]["signature"]
    save(tmp_path, done["filename"], body, statement)
    _, problems = verify_file(path)
    assert problems == []
    assert statement["generated_at"] == NOW.isoformat()
    assert statement["as_of_position"] == as_of
