"""Starts the whole system on one machine and keeps it running.

The supervisor owns, in start order: embedded NATS and PostgreSQL (unless ``NATS_URL`` /
``DATABASE_URL`` point elsewhere), the outbox relay, and the services registered through entry
points (:mod:`libs.runtime.registry`), in their dependency order. It restarts any child
that exits, with exponential backoff, and stops them in reverse dependency order on SIGTERM or
SIGINT: services first (they may still publish or write while draining), then the relay, then the
servers.

Run it through ``mctl up``; ``python -m libs.runtime.supervisor --data-dir DIR`` is the process
``mctl`` starts. What is running is recorded in ``<data_dir>/state.json`` for ``mctl status`` and
``mctl down``; ``<data_dir>/supervisor.lock`` keeps a second supervisor off the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import httpx
import psutil
from pydantic import SecretStr

from libs.errors import Conflict, InvalidInput, MissionControlError, TransientError, first_line
from libs.eventbus.anchor import ensure_key_files
from libs.eventbus.migrate import RELAY_NAME, apply_all, login_roles
from libs.runtime.busauth import (
    RELAY_USER,
    authorization_config,
    bus_permissions,
    credentials_dir,
    write_credentials,
)
from libs.runtime.embedded import PG_DATABASE, ServerProcess, free_port, start_nats, start_postgres
from libs.runtime.pg_credentials import ensure_passwords, parse_role_passwords, with_credentials
from libs.runtime.registry import ServiceRegistration, discover, require_services
from libs.runtime.state import STATE_FILE, redact_url, write_json_atomic
from libs.runtime.urls import resolve_url
from libs.settings import Settings, load_settings

RELAY_MODULE = "libs.eventbus.relay"

LOCK_FILE = "supervisor.lock"
LOG_DIR = "logs"
SUPERVISOR_LOG = "supervisor.log"

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0
# A child that has stayed up this long is considered healthy again: its next crash starts the
# backoff from the beginning instead of waiting the maximum.
STABLE_AFTER_S = 30.0
POLL_INTERVAL_S = 0.2
# More processes of one service than this on one machine is a typo, not a plan.
MAX_REPLICAS = 16

PROJECT_ROOT = Path(__file__).resolve().parents[2]

ChildKind = Literal["server", "relay", "service"]


class SupervisorError(MissionControlError):
    """The system could not be started (the message says which part and why)."""

    code = "supervisor"


class AlreadyRunning(Conflict):
    """Another supervisor holds the lock on the data directory."""

    code = "already_running"


# --- pure helpers ---------------------------------------------------------------------------------


def backoff_delay(failures: int, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Seconds to wait before restarting a child that has failed ``failures`` times in a row.

    ``base * 2**failures``, capped at ``cap``: 0.5, 1, 2, 4, 8, 10, 10, ... with the defaults.
    """
    if failures < 0:
        raise ValueError("failures must be >= 0")
    # Capping the exponent first keeps 2**n from growing without bound for a child that never
    # comes back.
    return float(min(cap, base * 2 ** min(failures, 32)))


def describe_exit(returncode: int) -> str:
    """``"code 3"`` or ``"signal SIGKILL"`` for a Popen return code."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def parse_replicas(spec: str) -> dict[str, int]:
    """``{"cost": 2, "incident": 3}`` from ``MC_REPLICAS`` / ``mctl up --replicas``:
    ``"cost=2,incident=3"``. Spaces are ignored; an empty spec names nothing."""
    counts: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, number = (p.strip() for p in part.partition("="))
        if not sep or not name or not number.isdigit():
            raise InvalidInput(f"replicas: expected service=N, got {part!r}")
        count = int(number)
        if not 1 <= count <= MAX_REPLICAS:
            raise InvalidInput(
                f"replicas: {name} must run 1 to {MAX_REPLICAS} replicas, not {count}"
            )
        if name in counts:
            raise InvalidInput(f"replicas: {name} is named twice")
        counts[name] = count
    return counts


def replica_counts(
    spec: str, services: Sequence[ServiceRegistration], settings: Settings
) -> dict[str, int]:
    """How many processes of each registered service to run (one unless ``spec`` says more).

    Refuses unknown names, and more than one replica of a service whose
    ``scale_out_requires`` settings are not configured (it keeps its data in the process).
    """
    asked = parse_replicas(spec)
    known = {s.name: s for s in services}
    unknown = sorted(asked.keys() - known.keys())
    if unknown:
        raise InvalidInput(
            f"replicas: no service is registered as {', '.join(unknown)} "
            f"(registered: {', '.join(sorted(known))})"
        )
    for name, count in asked.items():
        reason = known[name].single_replica
        if count > 1 and reason:
            raise InvalidInput(f"replicas: {name} runs as one replica: {reason}")
        missing = [f for f in known[name].scale_out_requires if not settings.configured(f)]
        if count > 1 and missing:
            raise InvalidInput(
                f"replicas: {name} runs as one replica unless "
                f"{', '.join(m.upper() for m in missing)} is set"
            )
    return {s.name: asked.get(s.name, 1) for s in services}


def embedded_database_url(port: int) -> str:
    """The embedded server's database, without a user (each process logs in as its own role)."""
    return f"postgresql://127.0.0.1:{port}/{PG_DATABASE}"


def role_passwords(
    settings: Settings, data_dir: Path, roles: Sequence[str]
) -> dict[str, SecretStr]:
    """The password of each of ``roles``: from ``MC_DB_ROLE_PASSWORDS`` when it is set (and
    then it must name them all), else from the data directory, generated on first use."""
    if settings.db_role_passwords is not None:
        given = parse_role_passwords(settings.db_role_passwords)
        missing = sorted(set(roles) - given.keys())
        if missing:
            raise InvalidInput(f"MC_DB_ROLE_PASSWORDS: no password for {', '.join(missing)}")
        return {r: given[r] for r in roles}
    stored = ensure_passwords(data_dir, roles)
    return {r: stored[r] for r in roles}


def format_table(state: Mapping[str, Any]) -> str:
    """The human summary of a running system, from a ``state.json`` document."""
    rows = [("SERVICE", "PID", "URL")]
    for child in state.get("children", []):
        if child["kind"] == "server":
            continue
        rows.append((child["name"], str(child.get("pid") or "-"), child.get("url") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(col.ljust(widths[i]) for i, col in enumerate(r)).rstrip() for r in rows]
    lines.append("")
    gateway = next((c for c in state.get("children", []) if c["name"] == "gateway"), None)
    if gateway and gateway.get("url"):
        lines.append(f"Console   {gateway['url']}/  (sign in with a user or an API key)")
    lines.append(f"NATS      {state.get('nats_url')}")
    lines.append(f"Postgres  {state.get('database_url')}")
    lines.append(f"Data dir  {state.get('data_dir')}")
    return "\n".join(lines)


def lock_holder(data_dir: Path) -> int | None:
    """Pid of the supervisor holding ``data_dir``'s lock, or ``None`` when nobody holds it."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def acquire_lock(data_dir: Path) -> int:
    """Take the exclusive supervisor lock of ``data_dir``; return the fd that holds it.

    The lock is an ``flock`` on an open file, so the kernel releases it when the process dies,
    however it dies: a stale lock file never blocks the next ``mctl up``.
    """
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {text}" if text.isdigit() else "another process"
        raise AlreadyRunning(
            f"another supervisor ({who}) is already running on {data_dir}; "
            f"use `mctl status --data-dir {data_dir}` or `mctl down --data-dir {data_dir}`"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, and the same one when ``create_time``."""
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process started later than the one we recorded.
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _die_with_parent(parent: int) -> Callable[[], None]:
    """``preexec_fn`` that makes the child get SIGTERM when the supervisor dies (Linux).

    Without it a supervisor killed with SIGKILL would leave services running with nobody to
    restart or stop them.
    """

    def fn() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return fn


# --- children -------------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    kind: ChildKind
    service: str | None = None
    """The registered service this process runs (its replicas share it; ``name`` is unique)."""
    port: int | None = None
    url: str | None = None
    module: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    server: ServerProcess | None = None
    starter: Callable[[int | None], ServerProcess] | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        """The current OS process, whichever way it was started."""
        return self.server.proc if self.server is not None else self.proc

    @property
    def pid(self) -> int | None:
        """Pid of the current process (``None`` before the first start)."""
        p = self.popen
        return p.pid if p is not None else None

    def returncode(self) -> int | None:
        """``None`` while running, else the exit status (reaping the process)."""
        p = self.popen
        return None if p is None else p.poll()

    def to_state(self) -> dict[str, Any]:
        """This child's entry in ``state.json``."""
        create_time: float | None = None
        if self.pid is not None and self.returncode() is None:
            with contextlib.suppress(psutil.Error):
                create_time = psutil.Process(self.pid).create_time()
        return {
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "pid": self.pid,
            "create_time": create_time,
            "port": self.port,
            "url": self.url,
            "restarts": self.restarts,
            "status": "restarting" if self.restart_at is not None else "running",
            "log": str(self.log_path) if self.log_path else None,
        }


class Supervisor:
    """Starts, watches and stops every process of one Mission Control system.

    ``settings`` decide whether to start embedded servers (``NATS_URL``, ``DATABASE_URL``) and
    how many replicas of each service to run (``MC_REPLICAS``); ``services`` default to those
    registered through entry points, already in start order.
    Children inherit this process's environment, on top of which the supervisor sets the
    servers' URLs and each service's name and port.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: Settings | None = None,
        services: Sequence[ServiceRegistration] | None = None,
        *,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.log_dir = self.data_dir / LOG_DIR
        self.settings = settings if settings is not None else load_settings()
        self.services = tuple(services) if services is not None else discover()
        self.replicas = replica_counts(self.settings.replicas, self.services, self.settings)
        self.ready_timeout = ready_timeout
        self.children: list[Child] = []
        self.nats_url = ""
        self.database_url = ""
        self.admin_url: str | None = None
        self.nats_credentials_dir: Path | None = None
        """Where each NATS user's password file is (``None``: the processes inherit
        ``NATS_USER`` / ``NATS_PASSWORD`` from the environment, if any)."""
        self.process_database_urls: dict[str, str] = {}
        """Process name (relay, each service) → the URL it connects with, as its own role."""
        self._stop_requested = False
        self._lock_fd: int | None = None
        self._log_file: Any = None

    # -- public ------------------------------------------------------------------------------------

    def up(self) -> int:
        """Start everything, wait until ready, then supervise until SIGTERM/SIGINT; return 0."""
        require_services(self.services)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.data_dir)
        # A state.json left by a supervisor that was killed describes processes that are gone.
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        self._open_log()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._log(f"supervisor {os.getpid()} starting in {self.data_dir}")
            self._start_infrastructure()
            if not self._stop_requested:
                self._start_processes()
            if not self._stop_requested and self._wait_ready():
                self._write_state()
                print(format_table(self._state()), flush=True)
                self._log("all services ready")
                self._watch()
        finally:
            self._shutdown()
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)
            self._log("supervisor stopped")
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release()
        return 0

    def request_stop(self) -> None:
        """Ask :meth:`up` to shut everything down and return (what SIGTERM does)."""
        self._stop_requested = True

    # -- start -------------------------------------------------------------------------------------

    def _start_infrastructure(self) -> None:
        # No data dir for the resolver: the state file is this supervisor's to write, and one
        # left behind describes servers that are gone. What is not configured is embedded.
        nats = resolve_url("nats", settings=self.settings)
        if nats is not None:
            self.nats_url = nats.secret()
            self._external_nats_users()
        else:
            users = self._new_nats_users()
            server = self._add_server("nats", lambda port: start_nats(self.data_dir, port, users))
            self.nats_url = server.url or ""
        if self._stop_requested:
            return
        database = resolve_url("database", settings=self.settings)
        if database is not None:
            self.database_url = database.secret()
            admin = resolve_url("admin_database", settings=self.settings) or database
            migrate_url = admin.secret()
        else:
            pg = self._add_server("postgres", lambda port: start_postgres(self.data_dir, port))
            assert pg.port is not None
            assert pg.url is not None
            assert pg.server is not None
            self.admin_url = pg.url  # no password in it: it is recorded in state.json
            migrate_url = pg.server.dsn()
            self.database_url = embedded_database_url(pg.port)
        roles = login_roles(self.services)
        passwords = role_passwords(self.settings, self.data_dir, sorted(set(roles.values())))
        self.process_database_urls = {
            name: with_credentials(self.database_url, role, passwords[role])
            for name, role in roles.items()
        }
        try:
            applied = apply_all(migrate_url, passwords, self.services)
        except Exception as exc:
            raise SupervisorError(
                f"migrations failed on {redact_url(migrate_url)}: {_first_line(exc)}"
            ) from exc
        self._log(f"migrations applied: {', '.join(applied) if applied else 'none pending'}")

    # -- NATS users (libs/runtime/busauth.py) -----------------------------------------------------

    def _new_nats_users(self) -> str:
        """New passwords for every NATS user of this system, each in its file (mode 0600) under
        the data directory; returns the embedded server's users block (bcrypt hashes)."""
        permissions = bus_permissions(self.services)
        self.nats_credentials_dir = credentials_dir(self.data_dir)
        passwords = write_credentials(self.nats_credentials_dir, permissions)
        self._log(
            f"NATS users {', '.join(sorted(permissions))}: passwords in "
            f"{self.nats_credentials_dir} (mode 0600)"
        )
        return authorization_config(permissions, passwords)

    def _external_nats_users(self) -> None:
        """With ``MC_NATS_CREDENTIALS_DIR``, check that it holds a password file for every
        process; without it the processes inherit the environment's ``NATS_USER``."""
        directory = self.settings.nats_credentials_dir
        if directory is None:
            return
        missing = sorted(
            user for user in bus_permissions(self.services) if not (directory / user).is_file()
        )
        if missing:
            raise SupervisorError(
                f"MC_NATS_CREDENTIALS_DIR {directory} has no password file for {', '.join(missing)}"
            )
        self.nats_credentials_dir = directory.resolve()

    def _nats_env(self, user: str) -> dict[str, str]:
        """The environment that makes a child connect to NATS as ``user``: its password file,
        never the password itself."""
        if self.nats_credentials_dir is None:
            return {}
        return {"NATS_USER": user, "NATS_PASSWORD_FILE": str(self.nats_credentials_dir / user)}

    def _add_server(self, name: str, start: Callable[[int | None], ServerProcess]) -> Child:
        try:
            server = start(None)
        except Exception as exc:
            raise SupervisorError(f"could not start embedded {name}: {_first_line(exc)}") from exc
        child = Child(
            name=name, kind="server", port=server.port, url=server.url, server=server, starter=start
        )
        child.started_at = time.monotonic()
        self.children.append(child)
        self._log(f"started {name} pid {server.proc.pid} at {server.url}")
        return child

    def _start_processes(self) -> None:
        for child in self.plan_processes():
            self.children.append(child)
            self._spawn(child)

    def plan_processes(self) -> list[Child]:
        """The relay, then every registered service in start order, ready to spawn.

        Each service gets a free port and the environment that tells it where the servers are;
        spawning them in this order is what ``after`` in a registration means (the supervisor
        then waits for all of them to be ready together). A service with more than one replica
        gets one process per replica, named ``<service>``, ``<service>-2``, ...: they share
        its request queue group and durable consumers, so they split its work between them.
        """
        common = {
            "NATS_URL": self.nats_url,
            "DATABASE_URL": self.database_url,
            "MC_DATA_DIR": str(self.data_dir),
            # The children import this checkout even when it is not installed.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            # Log lines reach the log files as they happen, not when a buffer fills.
            "PYTHONUNBUFFERED": "1",
        }
        planned = [
            Child(
                name="relay",
                kind="relay",
                module=RELAY_MODULE,
                env={
                    **common,
                    **self._nats_env(RELAY_USER),
                    "MC_SERVICE": "relay",
                    **self._anchor_key_env(),
                    **self._database_env(RELAY_NAME),
                },
                log_path=self.log_dir / "relay.log",
            )
        ]
        host = self.settings.http_host
        for service in self.services:
            for replica in range(1, self.replicas.get(service.name, 1) + 1):
                name = service.name if replica == 1 else f"{service.name}-{replica}"
                port = free_port()
                planned.append(
                    Child(
                        name=name,
                        kind="service",
                        service=service.name,
                        port=port,
                        url=f"http://127.0.0.1:{port}",
                        module=service.module,
                        env={
                            **common,
                            **self._nats_env(service.name),
                            "MC_SERVICE": service.name,
                            "MC_HTTP_HOST": host,
                            "MC_HTTP_PORT": str(port),
                            **self._database_env(service.name),
                        },
                        log_path=self.log_dir / f"{name}.log",
                    )
                )
        return planned

    def _anchor_key_env(self) -> dict[str, str]:
        """The checkpoint signing key for the relay: the operator's ``MC_ANCHOR_SIGNING_KEY``
        (inherited as it is), else the key kept in the data dir, generated on first use."""
        if self.settings.anchor_signing_key is not None:
            return {}
        private, _ = ensure_key_files(self.data_dir)
        return {"MC_ANCHOR_SIGNING_KEY": private.read_text()}

    def _database_env(self, name: str) -> dict[str, str]:
        """``DATABASE_URL`` of process ``name``: its own role's, with that role's password."""
        url = self.process_database_urls.get(name)
        return {"DATABASE_URL": url} if url else {}

    def _spawn(self, child: Child) -> None:
        assert child.module is not None
        assert child.log_path is not None
        # Inherited so that every child's own Settings see what the operator configured. Its
        # name as PostgreSQL's application_name, so pg_stat_activity tells the processes apart.
        env = {**os.environ, "PGAPPNAME": child.name, **child.env}
        with child.log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} supervisor: starting {child.name}\n".encode())
            log.flush()
            child.proc = subprocess.Popen(
                [sys.executable, "-m", child.module],
                env=env,
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C on the terminal reaches the supervisor only,
                # which then stops the children in order.
                process_group=0,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        child.started_at = time.monotonic()

    def _start_child(self, child: Child) -> None:
        if child.starter is not None:
            # The same port again, so the URLs already handed to the other children stay valid.
            child.server = child.starter(child.port)
            child.url = child.server.url
        else:
            self._spawn(child)
        child.started_at = time.monotonic()

    # -- readiness ---------------------------------------------------------------------------------

    def _services(self) -> list[Child]:
        return [c for c in self.children if c.kind == "service"]

    def _wait_ready(self) -> bool:
        """Poll every service's ``/readyz`` until all answer 200; ``False`` if stopped first."""
        deadline = time.monotonic() + self.ready_timeout
        pending = {c.name for c in self._services()}
        with httpx.Client(timeout=2.0) as client:
            while pending:
                if self._stop_requested:
                    return False
                # A service that crashes on start is restarted while we wait.
                self._tick()
                for child in self._services():
                    if child.name in pending and _is_ready(client, child.url):
                        pending.discard(child.name)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise SupervisorError(self._not_ready_report(sorted(pending)))
                time.sleep(POLL_INTERVAL_S)
        return True

    def _not_ready_report(self, names: list[str]) -> str:
        parts = [
            f"not ready within {self.ready_timeout:.0f}s: {', '.join(names)}",
        ]
        for child in self.children:
            if child.name in names and child.log_path is not None:
                parts.append(f"--- last lines of {child.log_path}:\n{tail(child.log_path, 8)}")
        return "\n".join(parts)

    # -- watch -------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop_requested:
            self._tick()
            time.sleep(POLL_INTERVAL_S)

    def _tick(self) -> None:
        """Notice exited children and restart those whose backoff has elapsed."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if self._stop_requested:
                return
            code = child.returncode()
            if code is None:
                if child.failures and now - child.started_at > STABLE_AFTER_S:
                    child.failures = 0
                continue
            if child.restart_at is None:
                delay = backoff_delay(child.failures)
                child.failures += 1
                child.restart_at = now + delay
                self._log(
                    f"{child.name} (pid {child.pid}) exited with {describe_exit(code)}; "
                    f"restarting in {delay:.1f}s"
                )
                changed = True
            elif now >= child.restart_at:
                changed = True
                try:
                    self._start_child(child)
                except Exception as exc:
                    delay = backoff_delay(child.failures)
                    child.failures += 1
                    child.restart_at = time.monotonic() + delay
                    self._log(
                        f"restart of {child.name} failed: {_first_line(exc)}; "
                        f"retrying in {delay:.1f}s"
                    )
                else:
                    child.restarts += 1
                    child.restart_at = None
                    self._log(
                        f"restarted {child.name}: pid {child.pid} (restart #{child.restarts})"
                    )
        if changed and (self.data_dir / STATE_FILE).exists():
            self._write_state()

    # -- stop --------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stop_requested:
            self._log(f"received {signal.Signals(signum).name}: stopping")
        self._stop_requested = True

    def _shutdown(self) -> None:
        self._stop_requested = True
        services = self._services()
        relays = [c for c in self.children if c.kind == "relay"]
        if services:
            self._log("stopping services")
            self._terminate([c.proc for c in services if c.proc is not None])
        if relays:
            self._log("stopping relay")
            self._terminate([c.proc for c in relays if c.proc is not None])
        # Postgres before NATS, the reverse of their start order.
        for child in reversed([c for c in self.children if c.kind == "server"]):
            if child.server is not None:
                self._log(f"stopping {child.name}")
                try:
                    child.server.stop()
                except Exception as exc:
                    self._log(f"stopping {child.name} failed: {_first_line(exc)}")

    def _terminate(self, procs: list[subprocess.Popen[bytes]]) -> None:
        """SIGTERM all of ``procs``, wait up to STOP_TIMEOUT_S, then SIGKILL what remains."""
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in alive):
            time.sleep(0.05)
        for p in alive:
            if p.poll() is None:
                self._log(f"pid {p.pid} did not stop within {STOP_TIMEOUT_S:.0f}s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- state and logging -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "nats_url": redact_url(self.nats_url),
            "database_url": redact_url(self.database_url),
            # Only the embedded server's admin URL is recorded: it has no password to leak.
            "postgres_admin_url": self.admin_url,
            "updated_at": datetime.now(UTC).isoformat(),
            "children": [c.to_state() for c in self.children],
        }

    def _write_state(self) -> None:
        write_json_atomic(self.data_dir / STATE_FILE, self._state())

    def _open_log(self) -> None:
        path = self.log_dir / SUPERVISOR_LOG
        # Detached, stdout already is this file (``mctl up --detach``): write each line once.
        try:
            out, log = os.fstat(sys.stdout.fileno()), os.stat(path)
            same = (out.st_dev, out.st_ino) == (log.st_dev, log.st_ino)
        except (OSError, ValueError):
            same = False
        if not same:
            self._log_file = path.open("a", encoding="utf-8")

    def _log(self, message: str) -> None:
        line = f"{datetime.now(UTC).isoformat(timespec='milliseconds')} supervisor: {message}"
        print(line, flush=True)
        if self._log_file is not None:
            self._log_file.write(line + "\n")
            self._log_file.flush()


def _is_ready(client: httpx.Client, url: str | None) -> bool:
    if url is None:
        return False
    try:
        return client.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _first_line(exc: BaseException) -> str:
    first = first_line(exc)
    # initdb and friends explain themselves on stderr, which the exception text leaves out.
    stderr = getattr(exc, "stderr", None)
    if isinstance(exc, subprocess.CalledProcessError) and stderr:
        detail = stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr)
        lines = [line for line in detail.strip().splitlines() if line.strip()]
        if lines:
            first = f"{first}: {' / '.join(lines[-3:])}"
    return first


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m libs.runtime.supervisor --data-dir DIR``."""
    # Raised when the embedded PostgreSQL package is imported on a machine without a login
    # session; harmless here, and it would be the first thing a user sees on the terminal.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    parser = argparse.ArgumentParser(prog="python -m libs.runtime.supervisor")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        code = Supervisor(args.data_dir).up()
    except (MissionControlError, TransientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
