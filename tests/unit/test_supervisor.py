"""The supervisor's pure pieces: backoff, formatting, state and lock files, restart bookkeeping,
and what it starts for the registered services."""

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
from typer.testing import CliRunner

from libs.errors import InvalidInput
from libs.runtime import state as st
from libs.runtime import supervisor as sup
from libs.runtime.cli import app
from libs.runtime.registry import RegistrationError, ServiceRegistration
from libs.settings import Settings

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
        st.redact_url("postgresql://mc:s3cret@db.example:5432/missioncontrol?sslmode=require")
        == "postgresql://mc:***@db.example:5432/missioncontrol?sslmode=require"
    )
    plain = "postgresql://mc_service@127.0.0.1:5432/missioncontrol"
    assert st.redact_url(plain) == plain


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mc@db/missioncontrol?password=s3cret&sslmode=require",
        "host=db user=mc password=s3cret dbname=missioncontrol",
        "host=db user=mc password = 's3 cr\\'et' dbname=missioncontrol",
        "postgresql://mc:s3cret@db:not-a-port/missioncontrol",
        "nats://mc:s3cret@127.0.0.1:4222",
    ],
)
def test_redact_url_hides_the_password_in_every_form_libpq_and_nats_accept(url: str) -> None:
    shown = st.redact_url(url)
    assert "s3" not in shown and "***" in shown


def test_a_connection_string_the_driver_cannot_parse_is_never_quoted_back() -> None:
    import psycopg

    from libs.errors import first_line

    with pytest.raises(psycopg.ProgrammingError) as info:
        psycopg.connect("mc:s3cret@localhost/missioncontrol")
    assert "s3cret" in str(info.value)  # what libpq says
    assert "s3cret" not in first_line(info.value)


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
    assert "Console   http://127.0.0.1:3/  (sign in with a user or an API key)" in lines
    assert not any(line.startswith("nats ") for line in lines)


def test_state_round_trips_and_a_missing_or_torn_file_reads_as_none(tmp_path: Path) -> None:
    assert st.read_state(tmp_path) is None
    st.write_json_atomic(tmp_path / st.STATE_FILE, {"supervisor_pid": 1, "children": []})
    assert st.read_state(tmp_path) == {"supervisor_pid": 1, "children": []}
    assert [p.name for p in tmp_path.iterdir()] == [st.STATE_FILE]
    (tmp_path / st.STATE_FILE).write_text('{"supervisor_pid": ')
    assert st.read_state(tmp_path) is None


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
    state = json.loads((tmp_path / st.STATE_FILE).read_text())
    assert state["supervisor_pid"] == os.getpid()
    assert state["children"][0]["restarts"] == 2
    assert state["children"][0]["pid"] == proc.pid


def _services() -> tuple[ServiceRegistration, ...]:
    # Given in start order, as discover() returns them.
    return (
        ServiceRegistration(name="backend", module="pkg.backend"),
        ServiceRegistration(name="front", module="pkg.front", after=("backend",)),
    )


def test_plan_starts_the_relay_then_the_registered_services_in_order(tmp_path: Path) -> None:
    settings = Settings(MC_HTTP_HOST="0.0.0.0")
    s = sup.Supervisor(tmp_path, settings, _services())
    s.nats_url = "nats://127.0.0.1:1"
    s.database_url = "postgresql://mc_service:pw@127.0.0.1:2/missioncontrol"
    planned = s.plan_processes()
    assert [(c.name, c.kind, c.module) for c in planned] == [
        ("relay", "relay", sup.RELAY_MODULE),
        ("backend", "service", "pkg.backend"),
        ("front", "service", "pkg.front"),
    ]
    ports = set()
    for child in planned:
        assert child.env["NATS_URL"] == "nats://127.0.0.1:1"
        assert child.env["DATABASE_URL"] == s.database_url
        assert child.env["MC_DATA_DIR"] == str(tmp_path.resolve())
        assert child.env["MC_SERVICE"] == child.name
        assert child.log_path == s.log_dir / f"{child.name}.log"
        if child.kind == "service":
            assert child.env["MC_HTTP_HOST"] == "0.0.0.0"
            assert child.env["MC_HTTP_PORT"] == str(child.port)
            assert child.url == f"http://127.0.0.1:{child.port}"
            ports.add(child.port)
    assert len(ports) == 2


def test_state_never_records_a_password(tmp_path: Path) -> None:
    s = sup.Supervisor(tmp_path, Settings(), _services())
    s.nats_url = "nats://user:natspw@127.0.0.1:1"
    s.database_url = "postgresql://mc_service:dbpw@db.example:5432/missioncontrol"
    s._write_state()
    text = (tmp_path / st.STATE_FILE).read_text()
    assert "natspw" not in text
    assert "dbpw" not in text
    assert "postgresql://mc_service:***@db.example:5432/missioncontrol" in text


def test_a_supervisor_without_registered_services_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="no services are registered"):
        sup.Supervisor(tmp_path / "mc", Settings(), ()).up()
    # It refused before taking the data directory.
    assert not (tmp_path / "mc").exists()


def test_replicas_parse_service_counts_and_name_what_is_wrong() -> None:
    assert sup.parse_replicas("") == {}
    assert sup.parse_replicas(" cost=2 , incident = 3,") == {"cost": 2, "incident": 3}
    for bad, why in [
        ("cost", "expected service=N, got 'cost'"),
        ("cost=two", "expected service=N"),
        ("=2", "expected service=N"),
        ("cost=0", "cost must run 1 to 16 replicas, not 0"),
        ("cost=17", "not 17"),
        ("cost=2,cost=3", "cost is named twice"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            sup.parse_replicas(bad)


def test_replicas_of_unknown_services_or_of_one_without_its_shared_server_are_refused() -> None:
    services = (
        *_services(),
        ServiceRegistration(
            name="store", module="pkg.store", scale_out_requires=("clickhouse_url",)
        ),
    )
    assert sup.replica_counts("front=2", services, Settings()) == {
        "backend": 1,
        "front": 2,
        "store": 1,
    }
    with pytest.raises(InvalidInput, match="no service is registered as nope"):
        sup.replica_counts("nope=2", services, Settings())
    single = ServiceRegistration(name="one", module="pkg.one", single_replica="it caches state")
    assert sup.replica_counts("one=1", (single,), Settings()) == {"one": 1}
    with pytest.raises(InvalidInput, match="one runs as one replica: it caches state"):
        sup.replica_counts("one=2", (single,), Settings(clickhouse_url="http://ch:8123"))
    with pytest.raises(InvalidInput, match="store runs as one replica unless CLICKHOUSE_URL"):
        sup.replica_counts("store=2", services, Settings())
    assert sup.replica_counts("store=1", services, Settings())["store"] == 1
    with_server = Settings(CLICKHOUSE_URL="http://ch.example:8123")
    assert sup.replica_counts("store=2", services, with_server)["store"] == 2


def test_plan_runs_one_process_per_replica_under_the_service_name(tmp_path: Path) -> None:
    s = sup.Supervisor(tmp_path, Settings(MC_REPLICAS="backend=3"), _services())
    s.nats_url = "nats://127.0.0.1:1"
    s.database_url = "postgresql://mc_service@127.0.0.1:2/missioncontrol"
    services = [c for c in s.plan_processes() if c.kind == "service"]
    assert [(c.name, c.service, c.module) for c in services] == [
        ("backend", "backend", "pkg.backend"),
        ("backend-2", "backend", "pkg.backend"),
        ("backend-3", "backend", "pkg.backend"),
        ("front", "front", "pkg.front"),
    ]
    # Replicas are the same service (one queue group, the same durables), each on its own port
    # and with its own log file.
    assert {c.env["MC_SERVICE"] for c in services[:3]} == {"backend"}
    assert len({c.port for c in services}) == 4
    assert len({c.log_path for c in services}) == 4
    assert [c.to_state()["service"] for c in services] == ["backend"] * 3 + ["front"]


def test_a_supervisor_refuses_bad_replicas_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no service is registered as ghost"):
        sup.Supervisor(tmp_path / "mc", Settings(MC_REPLICAS="ghost=2"), _services())
    assert not (tmp_path / "mc").exists()


def test_mctl_up_refuses_bad_replicas_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("MC_REPLICAS", raising=False)
    data_dir = tmp_path / "mc"
    result = CliRunner().invoke(
        app, ["up", "--data-dir", str(data_dir), "--replicas", "cost=2,audit-replay=2"]
    )
    assert result.exit_code == 1
    assert result.output.startswith(
        "error: replicas: audit-replay runs as one replica: its projector keeps"
    )
    # The variable is checked the same way as the flag.
    monkeypatch.setenv("MC_REPLICAS", "ghost=2")
    result = CliRunner().invoke(app, ["up", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "no service is registered as ghost" in result.output
    assert not data_dir.exists()
