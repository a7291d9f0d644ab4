"""Full exports through the public API of a whole running system: ``mctl export`` with its job,
``mctl verify-export`` on the file and on a tampered copy, and a run whose export and trace are
larger than a NATS message answered whole, never 413."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from libs.eventbus.anchor import KEY_DIR, PUBLIC_KEY_FILE
from services.gateway.client import MissionControlClient
from tests.e2e.conftest import RunningSystem, wait_for
from tests.e2e.test_governed_run import _seed_000

pytestmark = pytest.mark.e2e

# The whole system's NATS servers carry at most this much in one message (libs/runtime/embedded).
NATS_MAX_PAYLOAD = 8 * 1024 * 1024


def _mctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_mctl_exports_a_run_as_a_job_and_verify_export_names_tampering(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    tenant = f"exp{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    client = MissionControlClient(whole_system.gateway_url, key, timeout=30)
    run, denied = _seed_000(client)
    assert denied.outcome == "deny"
    gw = ("--url", whole_system.gateway_url, "--api-key", key)
    pub = whole_system.data_dir / KEY_DIR / PUBLIC_KEY_FILE
    out = tmp_path / "run.ndjson"

    # The run's incident is opened by its own service: wait until the export holds it.
    def exported() -> bool:
        got = _mctl("export", "run", run, "-o", str(out), *gw)
        assert got.returncode == 0, got.stderr
        return "incident" in out.read_text()

    wait_for(exported, timeout=60, what="the run's export to hold its incident")
    records = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert records[0]["kind"] == "header"
    assert records[-1]["kind"] == "end"
    assert any(r["kind"] == "checkpoint" for r in records)

    ok = _mctl("verify-export", str(out), "--public-key", str(pub), "--allow-unanchored")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: run ")

    tampered = tmp_path / "tampered.ndjson"
    tampered.write_bytes(out.read_bytes().replace(b'"outcome":"deny"', b'"outcome":"allow"', 1))
    broken = _mctl("verify-export", str(tampered), "--public-key", str(pub), "--allow-unanchored")
    assert broken.returncode == 1
    assert "BROKEN: edited_event" in broken.stderr

    with httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        listed = http.get("/v1/exports").json()["jobs"]
        assert listed and all(j["subject"]["id"] == run for j in listed)
        job = listed[0]
        assert job["status"] == "done"
        assert job["progress"]["done"] == job["progress"]["total"] > 0
        assert (
            http.post("/v1/exports", json={"subject_type": "tenant", "subject_id": run}).status_code
            == 422
        )
        assert (
            http.post("/v1/exports", json={"subject_type": "run", "subject_id": "nope"}).status_code
            == 404
        )
        assert http.get(f"/v1/exports/{uuid.uuid4()}").status_code == 404
        other = whole_system.key_for(f"{tenant}x")
        foreign = http.get(
            f"/v1/exports/{job['job_id']}", headers={"Authorization": f"Bearer {other}"}
        )
        assert foreign.status_code == 404
        replay = http.get(f"/v1/executions/{run}/replay")
        assert replay.status_code == 404


def test_a_run_larger_than_a_nats_message_exports_and_traces_whole(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    tenant = f"big{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    client = MissionControlClient(whole_system.gateway_url, key, timeout=60)
    run = client.start_run(agent_id="bulk-agent").run_id
    blob = "y" * 700_000
    steps = NATS_MAX_PAYLOAD // 700_000 + 3
    for i in range(1, steps + 1):
        client.admit(run, i, kind="tool_call", tool="read", input_tokens=1, max_output_tokens=1)
        client.record_step(run, i, kind="tool_call", tool="read", output=f"{i}:{blob}")

    with httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        full = http.get(f"/v1/runs/{run}/full-export")
        assert full.status_code == 200, full.text[:300]
        assert full.headers["content-type"].startswith("application/x-ndjson")
        assert len(full.content) > NATS_MAX_PAYLOAD
        events = [x for x in full.content.splitlines() if b'"kind":"event"' in x]
        assert len(events) >= 2 * steps

        def traced() -> httpx.Response | None:
            got = http.get(f"/v1/runs/{run}/trace")
            return got if got.status_code == 200 and len(got.json()["steps"]) == steps else None

        trace = wait_for(traced, timeout=60, what="the big run's trace")
        assert len(trace.content) > 0

    out = tmp_path / "big.ndjson"
    got = _mctl(
        "export",
        "run",
        run,
        "-o",
        str(out),
        "--url",
        whole_system.gateway_url,
        "--api-key",
        key,
    )
    assert got.returncode == 0, got.stderr
    assert out.stat().st_size > NATS_MAX_PAYLOAD
    pub = whole_system.data_dir / KEY_DIR / PUBLIC_KEY_FILE
    ok = _mctl("verify-export", str(out), "--public-key", str(pub), "--allow-unanchored")
    assert ok.returncode == 0, ok.stderr
