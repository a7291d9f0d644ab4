"""``mctl up / status / down`` against the real processes: supervisor, servers, relay, services."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from libs.runtime import cli
from libs.runtime.registry import discover
from libs.runtime.state import STATE_FILE
from libs.runtime.supervisor import PROJECT_ROOT, Supervisor
from libs.settings import Settings
from tests.conftest import System

pytestmark = pytest.mark.integration

# The services come from the installed entry points, as the supervisor's do.
SERVICE_NAMES = [s.name for s in discover()]


def mctl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(
    predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclass
class Running:
    data_dir: Path
    # Every pid seen during the test, so cleanup can find leftovers even after restarts.
    pids: set[int] = field(default_factory=set)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.data_dir / STATE_FILE).read_text())
        self.pids.add(state["supervisor_pid"])
        self.pids.update(c["pid"] for c in state["children"] if c.get("pid"))
        return state

    def child(self, name: str) -> dict[str, Any]:
        children: list[dict[str, Any]] = self.state()["children"]
        return next(c for c in children if c["name"] == name)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data_dir = tmp_path_factory.mktemp("runtime") / "mc"
    run = Running(data_dir)
    try:
        up = mctl("up", "--detach", "--data-dir", str(data_dir))
        log = data_dir / "logs" / "supervisor.log"
        assert up.returncode == 0, (
            f"{up.stdout}\n{up.stderr}\n{log.read_text() if log.exists() else ''}"
        )
        run.state()
        yield run
    finally:
        mctl("down", "--data-dir", str(data_dir), timeout=90)
        with contextlib.suppress(FileNotFoundError, ValueError):
            run.state()
        for pid in run.pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_up_prints_every_service(running: Running) -> None:
    state = running.state()
    names = {c["name"] for c in state["children"]}
    assert names == {"nats", "postgres", "relay", *SERVICE_NAMES}
    assert state["nats_url"].startswith("nats://127.0.0.1:")
    assert state["database_url"].startswith("postgresql://127.0.0.1:")


def test_processes_start_in_order_servers_relay_then_registered_services(running: Running) -> None:
    names = [c["name"] for c in running.state()["children"]]
    assert names == ["nats", "postgres", "relay", *SERVICE_NAMES]


def test_every_service_is_ready_healthy_and_exports_metrics(running: Running) -> None:
    with httpx.Client(timeout=5) as client:
        for name in SERVICE_NAMES:
            url = running.child(name)["url"]
            ready = client.get(f"{url}/readyz")
            assert ready.status_code == 200, (name, ready.text)
            health = client.get(f"{url}/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            metrics = client.get(f"{url}/metrics")
            assert metrics.status_code == 200
            assert "process_resident_memory_bytes" in metrics.text


def test_status_exits_zero_when_everything_is_ready(running: Running) -> None:
    result = mctl("status", "--data-dir", str(running.data_dir), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in SERVICE_NAMES:
        assert name in result.stdout


def test_second_supervisor_on_the_same_data_dir_is_refused(running: Running) -> None:
    result = mctl("up", "--detach", "--data-dir", str(running.data_dir), timeout=60)
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert "Traceback" not in result.stderr


def test_killed_service_is_restarted_with_a_new_pid(running: Running) -> None:
    victim = running.child("incident")
    old_pid = victim["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def restarted_and_ready() -> bool:
        child = running.child("incident")
        if child["pid"] == old_pid or child.get("restarts", 0) < victim["restarts"] + 1:
            return False
        return mctl("status", "--data-dir", str(running.data_dir), timeout=60).returncode == 0

    wait_until(restarted_and_ready, timeout=60, what="incident to be restarted and ready")
    assert not alive(old_pid)


def test_migrate_and_verify_use_the_embedded_database(running: Running) -> None:
    migrate = mctl("migrate", "--data-dir", str(running.data_dir), timeout=60)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "up to date" in migrate.stdout
    verify = mctl("verify", "--data-dir", str(running.data_dir), timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok:")


def test_up_generates_the_signing_key_and_the_relay_publishes_signed_checkpoints(
    running: Running,
) -> None:
    private = running.data_dir / "anchor" / "signing.key"
    public = running.data_dir / "anchor" / "signing.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.is_file()
    seen: list[str] = []

    def a_checkpoint_verifies() -> bool:
        verify = mctl("verify", "--data-dir", str(running.data_dir), timeout=60)
        seen[:] = [verify.stdout + verify.stderr]
        return verify.returncode == 0 and "matches its signed root" in verify.stdout

    wait_until(a_checkpoint_verifies, timeout=90, what="a signed checkpoint")
    assert "warning" not in seen[0]
    # The key never reaches a log.
    secret = "".join(private.read_text().splitlines()[1:-1])
    for log in (running.data_dir / "logs").iterdir():
        assert secret not in log.read_text(errors="replace"), log


def test_tenant_commands_find_the_running_systems_database(running: Running) -> None:
    create = mctl("tenant", "create", "runtime-t", "--data-dir", str(running.data_dir), timeout=60)
    assert create.returncode == 0, create.stdout + create.stderr
    assert "created tenant runtime-t" in create.stdout
    assert any(line.startswith("mc_") for line in create.stdout.splitlines())


def test_the_registered_demo_runs_against_the_system(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli._run_demo(running.state(), running.data_dir)
    out = capsys.readouterr().out
    assert "stopped_by_policy" in out
    assert "Inflection point of run C: step 3" in out
    # Then the workflow: approved by the demo's approver, and alerted by its budget.
    assert "execution.step_approved: publish approved by user:demo-approver" in out
    assert "budget.threshold_crossed: workflow:release-notes-demo:execution crossed 80 %" in out


def test_down_stops_every_process(running: Running) -> None:
    state = running.state()
    pids = [state["supervisor_pid"], *(c["pid"] for c in state["children"])]
    result = mctl("down", "--data-dir", str(running.data_dir), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (running.data_dir / STATE_FILE).exists()
    # The supervisor reaps its children before it exits, so nothing may be left by now.
    assert [p for p in pids if alive(p)] == []
    status = mctl("status", "--data-dir", str(running.data_dir), timeout=60)
    assert status.returncode == 1
    assert "not running" in status.stderr


def test_configured_servers_are_used_instead_of_embedded_ones(
    system: System, tmp_path: Path
) -> None:
    settings = Settings(
        nats_url=system.nats_url,
        database_url=system.service_url,
        database_admin_url=system.admin_url,
    )
    sup = Supervisor(tmp_path, settings)
    sup.log_dir.mkdir(parents=True)
    sup._open_log()
    try:
        sup._start_infrastructure()
    finally:
        sup._shutdown()  # stops whatever it started, should it have started servers
        sup._release()
    assert sup.children == []  # no embedded server was started
    assert (sup.nats_url, sup.database_url) == (system.nats_url, system.service_url)
    # Migrations ran (nothing pending: the session applied them) with the admin role.
    assert sup.admin_url is None
    assert "migrations applied: none pending" in (tmp_path / "logs" / "supervisor.log").read_text()
