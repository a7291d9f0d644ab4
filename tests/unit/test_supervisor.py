"""The supervisor's pure pieces: backoff, formatting, state and lock files, restart bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from libs.runtime import supervisor as sup

pytestmark = pytest.mark.unit


def test_backoff_doubles_from_half_a_second_and_caps_at_ten() -> None:
    assert [sup.backoff_delay(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_never_exceeds_the_cap_even_after_many_failures() -> None:
    assert sup.backoff_delay(10_000) == 10.0
    assert sup.backoff_delay(3, base=1.0, cap=5.0) == 5.0


def test_backoff_rejects_negative_failure_counts() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        sup.backoff_delay(-1)


def test_describe_exit_names_signals_and_codes() -> None:
    assert sup.describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert sup.describe_exit(3) == "code 3"
    assert sup.describe_exit(0) == "code 0"


def test_redact_url_hides_only_the_password() -> None:
    assert (
        sup.redact_url("postgresql://mc:s3cret@db.example:5432/missioncontrol?sslmode=require")
        == "postgresql://mc:***@db.example:5432/missioncontrol?sslmode=require"
    )
    plain = "postgresql://mc_service@127.0.0.1:5432/missioncontrol"
    assert sup.redact_url(plain) == plain


def test_format_table_lists_processes_but_not_servers() -> None:
    state = {
        "nats_url": "nats://127.0.0.1:1",
        "database_url": "postgresql://mc_service@127.0.0.1:2/missioncontrol",
        "data_dir": "/data",
        "children": [
            {"name": "nats", "kind": "server", "pid": 10, "url": "nats://127.0.0.1:1"},
            {"name": "relay", "kind": "relay", "pid": 11, "url": None},
            {"name": "gateway", "kind": "service", "pid": 12, "url": "http://127.0.0.1:3"},
        ],
    }
    lines = sup.format_table(state).splitlines()
    assert lines[0].split() == ["SERVICE", "PID", "URL"]
    assert lines[1].split() == ["relay", "11", "-"]
    assert lines[2].split() == ["gateway", "12", "http://127.0.0.1:3"]
    assert "NATS      nats://127.0.0.1:1" in lines
    assert "Data dir  /data" in lines
    assert not any(line.startswith("nats ") for line in lines)


def test_state_round_trips_and_a_missing_or_torn_file_reads_as_none(tmp_path: Path) -> None:
    assert sup.read_state(tmp_path) is None
    sup.write_json_atomic(tmp_path / sup.STATE_FILE, {"supervisor_pid": 1, "children": []})
    assert sup.read_state(tmp_path) == {"supervisor_pid": 1, "children": []}
    assert [p.name for p in tmp_path.iterdir()] == [sup.STATE_FILE]
    (tmp_path / sup.STATE_FILE).write_text('{"supervisor_pid": ')
    assert sup.read_state(tmp_path) is None


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    assert sup.lock_holder(tmp_path) is None
    fd = sup.acquire_lock(tmp_path)
    try:
        assert sup.lock_holder(tmp_path) == os.getpid()
        with pytest.raises(sup.AlreadyRunning, match=f"pid {os.getpid()}"):
            sup.acquire_lock(tmp_path)
    finally:
        os.close(fd)
    assert sup.lock_holder(tmp_path) is None
    os.close(sup.acquire_lock(tmp_path))


def test_pid_alive_detects_recycled_pids() -> None:
    me = psutil.Process()
    assert sup.pid_alive(me.pid)
    assert sup.pid_alive(me.pid, me.create_time())
    assert not sup.pid_alive(me.pid, me.create_time() - 3600)
    assert not sup.pid_alive(None)
    assert not sup.pid_alive(0)


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert sup.tail(log, 3) == "line 97\nline 98\nline 99"
    assert sup.tail(tmp_path / "missing.log") == ""


def test_an_exited_child_is_restarted_after_its_backoff(tmp_path: Path) -> None:
    s = sup.Supervisor(tmp_path)
    s.log_dir.mkdir(parents=True)
    # ``python -m this`` prints and exits at once: a process that "crashes" immediately.
    child = sup.Child(name="svc", kind="relay", module="this", log_path=s.log_dir / "svc.log")
    s.children.append(child)
    s._spawn(child)
    assert child.proc is not None
    first_pid = child.pid
    child.proc.wait(10)

    s._tick()
    assert child.restart_at is not None
    assert child.failures == 1
    assert child.restart_at - time.monotonic() <= sup.backoff_delay(0)
    assert child.restarts == 0

    child.restart_at = time.monotonic() - 1  # the backoff has elapsed
    s._tick()
    assert child.restart_at is None
    assert child.restarts == 1
    assert child.pid != first_pid
    child.proc.wait(10)
    assert "starting svc" in child.log_path.read_text()

    # The second crash in a row waits twice as long.
    s._tick()
    assert child.failures == 2
    assert child.restart_at is not None
    assert child.restart_at - time.monotonic() > sup.backoff_delay(0)


def test_state_records_restart_counts(tmp_path: Path) -> None:
    s = sup.Supervisor(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    s.children.append(sup.Child(name="gateway", kind="service", proc=proc, restarts=2, port=1))
    s._write_state()
    state = json.loads((tmp_path / sup.STATE_FILE).read_text())
    assert state["supervisor_pid"] == os.getpid()
    assert state["children"][0]["restarts"] == 2
    assert state["children"][0]["pid"] == proc.pid
