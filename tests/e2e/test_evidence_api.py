"""Evidence through the whole running system: the demo writes a signed SOC2 evidence PDF and a
debrief of its stopped run's incident; the routes answer files or a named 4xx; ``mctl
verify-evidence`` accepts the files and names a tampered one."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from services.gateway.demo import DEMO_TENANT
from tests.e2e.conftest import DemoRun, RunningSystem, mctl, wait_for

pytestmark = pytest.mark.e2e

CONTROLS = (
    "CC6.1 Logical access",
    "CC6.2/6.3 Access changes",
    "CC7.2 Monitoring",
    "CC7.3/7.4 Incident response",
    "CC8.1 Change management",
)


def _printed_path(text: str, label: str) -> Path:
    match = re.search(rf"^{re.escape(label)}: (\S+)", text, re.M)
    assert match, f"{label} not printed"
    return Path(match.group(1))


def _verify(data_dir: Path, file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "libs.runtime.cli",
            "verify-evidence",
            str(file),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_the_demo_prints_a_signed_soc2_pdf_and_a_debrief_of_its_stopped_run(
    whole_system: RunningSystem, demo_run: DemoRun, tmp_path: Path
) -> None:
    text = demo_run.text
    pdf = _printed_path(text, "SOC2 evidence PDF")
    debrief = _printed_path(text, "Debrief of run C's incident")

    content = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True, text=True
    ).stdout
    for heading in CONTROLS:
        assert heading in content, heading
    assert f"Tenant: {DEMO_TENANT}" in content
    # The demo's run C was denied once and opened one incident (at least: the demo may have run
    # before in this system).
    assert re.search(r"^\s*Denials\s+[1-9]\d*\s*$", content, re.M)
    assert re.search(r"^\s*Incidents opened\s+[1-9]\d*\s*$", content, re.M)
    # The repository's bundle, activated when the system started (the shared tenant's stream).
    assert re.search(r"^\s*Policy bundles activated\s+[1-9]\d*\s*$", content, re.M)
    pages = subprocess.run(
        ["pdftoppm", "-png", "-r", "30", str(pdf), str(tmp_path / "p")], check=True
    )
    assert pages.returncode == 0 and list(tmp_path.glob("p*.png"))

    md = debrief.read_text()
    assert "what happened" in md and "recommended actions" in md
    assert "- **Runs stopped:** 1" in md
    assert "token\\_limit" in md or "token_limit" in md

    ok = _verify(whole_system.data_dir, pdf)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: soc2-evidence of demo"), ok.stdout
    assert "signature valid" in ok.stdout or "checkpoint none" in ok.stdout
    tampered = tmp_path / "tampered.pdf"
    data = bytearray(pdf.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tampered.write_bytes(bytes(data))
    (tmp_path / "tampered.pdf.sig").write_bytes(Path(f"{pdf}.sig").read_bytes())
    bad = _verify(whole_system.data_dir, tampered)
    assert bad.returncode == 1 and "the file was modified" in bad.stderr


def test_evidence_routes_answer_files_and_name_bad_input(whole_system: RunningSystem) -> None:
    key = whole_system.key_for(DEMO_TENANT)
    http = httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    now = datetime.now(UTC)
    period = {"from": (now - timedelta(days=1)).isoformat(), "to": now.isoformat()}
    for fmt, kind in (
        ("json", "application/json"),
        ("csv", "text/csv"),
        ("pdf", "application/pdf"),
    ):
        r = http.get("/v1/evidence/soc2", params={**period, "format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(kind)
        assert r.headers["x-evidence-sha256"].startswith("sha256:")
    bad = [
        ({"from": period["to"], "to": period["from"]}, 422, "period is empty"),
        ({**period, "format": "docx"}, 422, "format"),
        ({"from": "2026-01-01T00:00:00", "to": period["to"]}, 422, "timezone"),
        ({"to": period["to"]}, 422, "from"),
    ]
    for params, status, word in bad:
        r = http.get("/v1/evidence/soc2", params=params)
        assert r.status_code == status, (params, r.text)
        assert word in r.text.lower(), r.text
    r = http.get("/v1/incidents/0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/debrief")
    assert r.status_code == 404 and "not found" in r.text
    r = http.get("/v1/debriefs", params={**period, "format": "html"})
    assert r.status_code == 200 and r.text.startswith("<!DOCTYPE html>")

    out = mctl(
        "evidence",
        "soc2",
        "--from",
        period["from"],
        "--to",
        period["to"],
        "--format",
        "csv",
        "--url",
        whole_system.gateway_url,
        "--api-key",
        key,
        "--output",
        str(whole_system.data_dir / "cli-evidence.csv"),
    )
    path = Path(out.strip())
    assert path.read_text().startswith("control,kind,name,value,occurred_at,event_ids")
    assert _verify(whole_system.data_dir, path).returncode == 0


def test_an_admin_attests_and_the_history_lists_it(whole_system: RunningSystem) -> None:
    from tests.e2e.test_promotions import _person

    tenant = f"att{uuid.uuid4().hex[:10]}"
    key = whole_system.key_for(tenant)
    token = _person(whole_system, tenant, f"{tenant}-admin", "admin")
    base = whole_system.gateway_url
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    reader = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    now = datetime.now(UTC)
    body = {
        "standard": "iso27001",
        "from": (now - timedelta(days=1)).isoformat(),
        "to": (now + timedelta(minutes=1)).isoformat(),
    }
    # A key may read evidence but not attest: an attestation is a person's statement.
    assert reader.post("/v1/attestations", json=body).status_code == 403
    made = admin.post("/v1/attestations", json=body)
    assert made.status_code == 201, made.text
    record = made.json()
    assert record["requested_by"] == f"user:{tenant}-admin"
    listed = reader.get("/v1/attestations").json()["attestations"]
    assert [a["attestation_id"] for a in listed] == [record["attestation_id"]]
    pdf = reader.get(f"/v1/attestations/{record['attestation_id']}", params={"format": "pdf"})
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert pdf.headers["x-evidence-sha256"] == record["pdf_sha256"]
    bad = admin.post("/v1/attestations", json={**body, "standard": "pci"})
    assert bad.status_code == 422 and "standard" in bad.text


def _pinned_out(body: bytes) -> dict[str, object]:
    """The evidence without what depends on when and where in the log it was made."""
    doc: dict[str, object] = orjson.loads(body)["evidence"]
    for name in ("generated_at", "as_of_position", "checkpoint"):
        doc.pop(name)
    return doc


def test_soc2_evidence_as_a_job_through_the_gateway_and_mctl(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    tenant, other = (f"evj{uuid.uuid4().hex[:10]}" for _ in range(2))
    key = whole_system.key_for(tenant)
    base = whole_system.gateway_url
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    now = datetime.now(UTC)
    period = {
        "from": (now - timedelta(days=1)).isoformat(),
        "to": (now + timedelta(hours=1)).isoformat(),
    }

    started = http.post("/v1/evidence/soc2/jobs", json={**period, "format": "json"})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] == "queued"
    # The tenant's own events of the period so far: its creation and its key's issue.
    assert job["progress"]["done"] == 0 and job["progress"]["total"] >= 2
    path = f"/v1/evidence/soc2/jobs/{job['job_id']}"

    def finished() -> dict[str, object] | None:
        got: dict[str, object] = http.get(path).json()
        return got if got["status"] in ("done", "failed") else None

    done = wait_for(finished, timeout=60, what="the evidence job to finish")
    assert done["status"] == "done", done
    assert done["progress"] == {"done": job["progress"]["total"], "total": job["progress"]["total"]}
    file = http.get(f"{path}/download")
    assert file.status_code == 200, file.text
    assert file.headers["content-type"].startswith("application/json")
    assert file.headers["x-evidence-sha256"] == done["sha256"]
    statement = orjson.loads(base64.b64decode(file.headers["x-evidence-signature"]))
    assert statement["as_of_position"] == job["as_of_position"]
    sync = http.get("/v1/evidence/soc2", params={**period, "format": "json"})
    assert sync.status_code == 200, sync.text
    assert _pinned_out(file.content) == _pinned_out(sync.content)
    saved = tmp_path / "job.json"
    saved.write_bytes(file.content)
    assert _verify(whole_system.data_dir, saved).returncode == 0

    stranger = {"Authorization": f"Bearer {whole_system.key_for(other)}"}
    assert http.get(path, headers=stranger).status_code == 404
    assert http.get(f"{path}/download", headers=stranger).status_code == 404
    for body, word in (
        ({"from": period["to"], "to": period["from"]}, "period is empty"),
        ({"to": period["to"]}, "from"),
        ({**period, "format": "docx"}, "format"),
    ):
        bad = http.post("/v1/evidence/soc2/jobs", json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert word in bad.text.lower(), bad.text

    # mctl: the job with its progress bar (rendered as on a terminal), then FILE and FILE.sig.
    out = tmp_path / "evidence.pdf"
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "libs.runtime.cli", "evidence", "soc2", "-o", str(out)]
    command += ["--from", period["from"], "--to", period["to"], "--url", base, "--api-key", key]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert re.search(r"^evidence job [0-9a-f-]{36}$", proc.stderr, re.M), proc.stderr
    bar = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stderr)
    assert re.search(r"^done .*\b(\d+)/\1 events", bar, re.M), bar
    assert out.read_bytes().startswith(b"%PDF-")
    ok = _verify(whole_system.data_dir, out)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"ok: soc2-evidence of {tenant}"), ok.stdout
