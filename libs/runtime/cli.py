"""``mctl``: start, inspect, stop and check a Mission Control system.

``mctl up`` runs the supervisor (:mod:`libs.runtime.supervisor`) as a child process in its own
session, in the foreground or detached. Its own session means a Ctrl-C on the terminal reaches
only ``mctl``, which asks the supervisor to stop; the supervisor then stops the services, the
relay and the servers in order instead of all of them receiving the signal at once.

Services add their own sub-commands through their registration (``mctl tenant`` is the
gateway's), and the demo ``mctl up --demo`` runs is a registration's too: this module names no
service.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer

from libs.errors import MissionControlError, first_line
from libs.runtime import supervisor as sup
from libs.runtime.cli_support import (
    CliError,
    DatabaseUrlOption,
    DataDirOption,
    admin_database,
    command_group,
    data_dir_of,
    one_line_errors,
)
from libs.runtime.registry import ServiceRegistration, discover, resolve_ref
from libs.runtime.state import STATE_FILE, read_state
from libs.settings import load_settings

app = command_group("mctl", "Run and inspect Mission Control.")

# Infrastructure start (initdb on first use, migrations) comes on top of the supervisor's own
# 60 s readiness deadline.
UP_TIMEOUT_S = 180.0
DOWN_TIMEOUT_S = 60.0
POLL_S = 0.2


def mount_commands(target: typer.Typer, services: tuple[ServiceRegistration, ...]) -> None:
    """Mount every sub-command the ``services`` contribute (``mctl tenant`` ...) on ``target``."""
    taken = {
        c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")
        for c in target.registered_commands
    } | {g.name for g in target.registered_groups if g.name}
    for service in services:
        for name, ref in service.commands.items():
            if name in taken:
                raise CliError(f"service {service.name!r} adds `mctl {name}`, which exists already")
            sub = resolve_ref(ref)
            if not isinstance(sub, typer.Typer):
                raise CliError(f"{ref} (from {service.name!r}) is not a typer.Typer app")
            target.add_typer(sub, name=name)
            taken.add(name)


# --- up -------------------------------------------------------------------------------------------


class _StopForwarder:
    """Turns SIGINT/SIGTERM/SIGHUP to ``mctl`` into one SIGTERM to the supervisor."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopForwarder:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        typer.echo("stopping Mission Control ...", err=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def _wait_until_up(
    proc: subprocess.Popen[bytes], data_dir: Path, stop: _StopForwarder, log: Path | None
) -> dict[str, Any] | None:
    """The state once the supervisor reports every service ready; ``None`` if stopped first."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        code = proc.poll()
        if code is not None:
            if stop.requested:
                return None
            raise CliError(f"the supervisor exited with {sup.describe_exit(code)}{_why(log)}")
        state = read_state(data_dir)
        if state is not None and state.get("supervisor_pid") == proc.pid:
            return state
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            where = log or "the output above"
            raise CliError(f"the system was not up within {UP_TIMEOUT_S:.0f}s; see {where}")
        time.sleep(POLL_S)


def _why(log: Path | None) -> str:
    """The supervisor's last ``error:`` report from its log (else the log's last lines)."""
    if log is None:
        return ""  # in the foreground it went to the terminal already
    text = sup.tail(log, 300)
    start = text.rfind("\nerror: ")
    return "\n" + (text[start + 1 :] if start >= 0 else sup.tail(log, 25))


def _run_demo(state: dict[str, Any], data_dir: Path) -> bool:
    """Run every registered demo against the running system; ``False`` when one failed."""
    demos = [s for s in discover() if s.demo is not None]
    if not demos:
        typer.echo("note: no installed service has a demo; skipping it")
        return True
    urls = {c["name"]: c.get("url") for c in state["children"]}
    for service in demos:
        assert service.demo is not None
        try:
            run_demo = resolve_ref(service.demo)
            _resolve(run_demo(urls[service.name], data_dir))
        except Exception as exc:
            # The system stays up, so what the demo left behind can still be inspected.
            typer.echo(f"error: the demo of {service.name} failed: {first_line(exc)}", err=True)
            return False
    return True


def _resolve(result: Any) -> Any:
    """``result``, awaited first when a coroutine function produced it."""
    if not inspect.isawaitable(result):
        return result

    async def _await() -> Any:
        return await result

    return asyncio.run(_await())


@app.command()
@one_line_errors
def up(
    data_dir: DataDirOption = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Run in the background; return once ready.")
    ] = False,
    demo: Annotated[bool, typer.Option("--demo", help="Run the demo once ready.")] = False,
    replicas: Annotated[
        str | None,
        typer.Option(
            "--replicas",
            help="Processes per service, e.g. policy-admission=2,cost=2 (default: "
            "$MC_REPLICAS, else one each).",
        ),
    ] = None,
) -> None:
    """Start NATS, PostgreSQL, the relay and the services; supervise them until stopped."""
    env = dict(os.environ)
    if replicas is not None:
        env["MC_REPLICAS"] = replicas
    # Checked here as well as by the supervisor, so a bad value is refused before anything starts.
    settings = load_settings()
    sup.replica_counts(
        replicas if replicas is not None else settings.replicas, discover(), settings
    )
    data_dir = data_dir_of(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    holder = sup.lock_holder(data_dir)
    if holder is not None:
        who = f" (supervisor pid {holder})" if holder > 0 else ""
        raise sup.AlreadyRunning(f"Mission Control is already running on {data_dir}{who}")
    cmd = [sys.executable, "-m", "libs.runtime.supervisor", "--data-dir", str(data_dir)]
    log_path: Path | None = None
    if detach:
        log_dir = data_dir / sup.LOG_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / sup.SUPERVISOR_LOG
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=sup.PROJECT_ROOT,
                env=env,
            )
    else:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, start_new_session=True, cwd=sup.PROJECT_ROOT, env=env
        )
    demo_failed = False
    with _StopForwarder(proc) as stop:
        try:
            state = _wait_until_up(proc, data_dir, stop, log_path)
            if state is not None:
                if detach:
                    # In the foreground the supervisor printed the table on our terminal already.
                    typer.echo(sup.format_table(state))
                if demo:
                    demo_failed = not _run_demo(state, data_dir)
                if detach:
                    typer.echo(
                        f"running in the background; `mctl down --data-dir {data_dir}` stops it"
                    )
                    if demo_failed:
                        raise typer.Exit(1)
                    return
            code = proc.wait()
        except BaseException:
            # In the foreground nothing may outlive `mctl up`; detached, only a ready system may.
            if proc.poll() is None and (not detach or _state_missing(data_dir, proc.pid)):
                proc.send_signal(signal.SIGTERM)
                proc.wait(DOWN_TIMEOUT_S)
            raise
    if code != 0 or demo_failed:
        raise typer.Exit(code if code > 0 else 1)


def _state_missing(data_dir: Path, pid: int) -> bool:
    """Whether the supervisor ``pid`` has not (yet) reported a ready system on ``data_dir``."""
    state = read_state(data_dir)
    return state is None or state.get("supervisor_pid") != pid


# --- status ---------------------------------------------------------------------------------------


def _running_state(data_dir: Path) -> dict[str, Any]:
    state = read_state(data_dir)
    if state is None:
        raise CliError(f"Mission Control is not running on {data_dir} (no {STATE_FILE})")
    if not sup.pid_alive(state.get("supervisor_pid")):
        raise CliError(
            f"the supervisor (pid {state.get('supervisor_pid')}) of {data_dir} is not running; "
            "its state is stale (`mctl down` cleans up)"
        )
    return state


@app.command()
@one_line_errors
def status(data_dir: DataDirOption = None) -> None:
    """Show every process of the system; exit 1 unless all of them are up and ready."""
    data_dir = data_dir_of(data_dir)
    state = _running_state(data_dir)
    rows = [("NAME", "PID", "STATE", "RESTARTS", "URL")]
    healthy = True
    with httpx.Client(timeout=2.0) as client:
        for child in state["children"]:
            alive = sup.pid_alive(child.get("pid"), child.get("create_time"))
            if not alive:
                verdict = "restarting" if child.get("status") == "restarting" else "down"
            elif child["kind"] == "service":
                try:
                    ok = client.get(f"{child['url']}/readyz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                verdict = "ready" if ok else "not ready"
            else:
                verdict = "running"
            healthy = healthy and verdict in ("ready", "running")
            rows.append(
                (
                    child["name"],
                    str(child.get("pid") or "-"),
                    verdict,
                    str(child.get("restarts", 0)),
                    child.get("url") or "-",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    typer.echo(f"\nsupervisor pid {state['supervisor_pid']}, data dir {state['data_dir']}")
    if not healthy:
        raise typer.Exit(1)


# --- down -----------------------------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sup.pid_alive(pid):
            return True
        time.sleep(POLL_S)
    return not sup.pid_alive(pid)


def _stop_orphans(state: dict[str, Any]) -> int:
    """Stop children a dead supervisor left behind; return how many there were."""
    orphans = [
        c for c in state.get("children", []) if sup.pid_alive(c.get("pid"), c.get("create_time"))
    ]
    # Services first, servers last: the same order the supervisor stops them in.
    order = {"service": 0, "relay": 1, "server": 2}
    for child in sorted(orphans, key=lambda c: order.get(c["kind"], 3)):
        pid = int(child["pid"])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if not _wait_gone(pid, sup.STOP_TIMEOUT_S):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            _wait_gone(pid, 5)
    return len(orphans)


@app.command()
@one_line_errors
def down(data_dir: DataDirOption = None) -> None:
    """Stop the system running on the data directory and wait until it has exited."""
    data_dir = data_dir_of(data_dir)
    state = read_state(data_dir)
    # Before the services are ready there is no state.json yet, but the lock names the pid.
    pid = (state or {}).get("supervisor_pid") or sup.lock_holder(data_dir)
    if pid is not None and pid > 0 and sup.pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        typer.echo(f"stopping supervisor pid {pid} ...")
        if not _wait_gone(pid, DOWN_TIMEOUT_S):
            raise CliError(f"the supervisor (pid {pid}) did not stop within {DOWN_TIMEOUT_S:.0f}s")
        typer.echo("stopped")
        return
    if state is not None:
        stopped = _stop_orphans(state)
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        typer.echo(f"the supervisor was gone; stopped {stopped} leftover process(es)")
        return
    typer.echo(f"Mission Control is not running on {data_dir}")


# --- database -------------------------------------------------------------------------------------


@app.command()
@one_line_errors
def verify(
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM file of the key checkpoints must be signed with (default: "
            "$MC_ANCHOR_PUBLIC_KEY, else <data dir>/anchor/signing.pub when it exists).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check every stream's hash chain, its head and the signed checkpoints; exit 1 naming
    each problem found (truncated tail, deleted stream, edited row, reordered position ...)."""
    from libs.eventbus.anchor import KEY_DIR, PUBLIC_KEY_FILE, load_public_key
    from libs.eventbus.verify import verify_chains

    settings = load_settings()
    folder = data_dir_of(data_dir, settings)
    url = admin_database(database_url, folder, settings).secret()
    key_path = public_key or settings.anchor_public_key
    if key_path is None and (folder / KEY_DIR / PUBLIC_KEY_FILE).is_file():
        key_path = folder / KEY_DIR / PUBLIC_KEY_FILE
    trusted = load_public_key(key_path) if key_path is not None else None
    result = verify_chains(url, public_key=trusted)
    checked = f"{result.events} events in {result.streams} streams"
    if trusted is None:
        typer.echo(
            "warning: no public key (--public-key): checkpoint signatures and roots not checked",
            err=True,
        )
    if result.ok:
        anchored = (
            f", checkpoint {result.anchored} matches its signed root"
            if result.anchored is not None
            else ""
        )
        typer.echo(
            f"ok: {checked}, every chain and head intact; "
            f"{result.checkpoints} checkpoint signature(s) valid{anchored}"
        )
        return
    for finding in result.findings:
        typer.echo(f"BROKEN: {finding}", err=True)
    typer.echo(f"{len(result.findings)} problem(s) found ({checked} checked)", err=True)
    raise typer.Exit(1)


@app.command("verify-export")
@one_line_errors
def verify_export_file(
    file: Annotated[
        Path,
        typer.Argument(
            help="An export (NDJSON) from `mctl export` or a /full-export route.", dir_okay=False
        ),
    ],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM file of the key checkpoints are signed with (default: "
            "$MC_ANCHOR_PUBLIC_KEY, else <data dir>/anchor/signing.pub when it exists).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    allow_unanchored: Annotated[
        bool,
        typer.Option(
            "--allow-unanchored",
            help="Accept streams newer than the export's checkpoint (proved by their chain "
            "only) with a warning instead of failing.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Check an export offline (no server): every stream's hash chain, the store order, the
    checkpoint's signature and each stream head's inclusion proof; exit 1 naming each problem
    (edited, removed or reordered events, a forged checkpoint, a broken proof, a cut file)."""
    from libs.eventbus.anchor import KEY_DIR, PUBLIC_KEY_FILE, load_public_key
    from libs.eventbus.export import verify_export

    settings = load_settings()
    key_path = public_key or settings.anchor_public_key
    if key_path is None:
        default = data_dir_of(data_dir, settings) / KEY_DIR / PUBLIC_KEY_FILE
        if not default.is_file():
            raise CliError(
                "no public key to check the checkpoint's signature with: pass --public-key "
                "(the system's anchor/signing.pub)"
            )
        key_path = default
    trusted = load_public_key(key_path)
    try:
        with file.open("rb") as f:
            report = verify_export(f, trusted)
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}") from None
    if allow_unanchored:
        for finding in [f for f in report.findings if f.kind == "unanchored"]:
            typer.echo(f"warning: {finding}", err=True)
            report.findings.remove(finding)
    if report.ok:
        typer.echo(
            f"ok: {report.subject}: {report.events} events in {report.streams} streams, every "
            f"chain intact; checkpoint {report.checkpoint_seq} signed by the trusted key, "
            f"{report.anchored_streams} stream head(s) proved in its root"
        )
        return
    for finding in report.findings:
        typer.echo(f"BROKEN: {finding}", err=True)
    typer.echo(
        f"{len(report.findings)} problem(s) found in {file} ({report.events} events checked)",
        err=True,
    )
    raise typer.Exit(1)


@app.command("verify-evidence")
@one_line_errors
def verify_evidence(
    file: Annotated[
        Path, typer.Argument(help="The evidence file (FILE.sig beside it if not JSON).")
    ],
    data_dir: DataDirOption = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM file of the key the evidence must be signed with (default: "
            "<data dir>/evidence/signing.pub when it exists).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    anchor_key: Annotated[
        Path | None,
        typer.Option(
            "--anchor-key",
            help="PEM file of the event store's checkpoint key (default: $MC_ANCHOR_PUBLIC_KEY, "
            "else <data dir>/anchor/signing.pub when it exists).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check an evidence document offline: its sha256 against the signed statement, the ed25519
    signature, the signing key, and the checkpoint's signature; exit 1 naming each problem."""
    from libs.eventbus.anchor import KEY_DIR, PUBLIC_KEY_FILE, load_public_key
    from libs.evidence_signing import KEY_DIR as EVIDENCE_DIR
    from libs.evidence_signing import verify_file

    settings = load_settings()
    folder = data_dir_of(data_dir, settings)
    if not file.is_file():
        raise CliError(f"{file} does not exist")
    own = public_key or folder / EVIDENCE_DIR / PUBLIC_KEY_FILE
    trusted = load_public_key(own) if own.is_file() else None
    anchor = anchor_key or settings.anchor_public_key or folder / KEY_DIR / PUBLIC_KEY_FILE
    anchor_public = load_public_key(anchor) if anchor.is_file() else None
    statement, problems = verify_file(file, trusted=trusted, anchor_key=anchor_public)
    if trusted is None:
        typer.echo("warning: no trusted key (--public-key): checked against its own key", err=True)
    if problems:
        for problem in problems:
            typer.echo(f"BROKEN: {problem}", err=True)
        raise typer.Exit(1)
    checkpoint = statement.get("checkpoint") or {}
    typer.echo(
        f"ok: {statement.get('document')} of {statement.get('tenant_id')} signed by key "
        f"{statement.get('key_id')}, sha256 matches; checkpoint {checkpoint.get('seq', 'none')}"
        + (" signature valid" if anchor_public is not None and checkpoint else "")
    )


@app.command()
@one_line_errors
def migrate(
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
    role_passwords: Annotated[
        Path | None,
        typer.Option(
            "--role-passwords",
            help=(
                "Directory with one file per role (named by the role) holding its password, "
                "e.g. a mounted Kubernetes Secret."
            ),
            file_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Apply pending database migrations (the event store's and every installed service's).

    Creates the services' roles first and sets their passwords: from --role-passwords, else
    $MC_DB_ROLE_PASSWORDS (a JSON object of role name to password), else the data directory's
    (those ``mctl up`` generated), when there are any. A role given no password keeps its own.
    """
    from libs.eventbus.migrate import apply_all
    from libs.runtime.pg_credentials import load_passwords, parse_role_passwords, read_password_dir

    settings = load_settings()
    where = data_dir_of(data_dir, settings)
    url = admin_database(database_url, where, settings).secret()
    if role_passwords is not None:
        passwords = read_password_dir(role_passwords)
    elif settings.db_role_passwords is not None:
        passwords = parse_role_passwords(settings.db_role_passwords)
    else:
        passwords = load_passwords(where)
    applied = apply_all(url, passwords)
    if applied:
        for mid in applied:
            typer.echo(f"applied {mid}")
    else:
        typer.echo("database is up to date")


# --- nats-users -----------------------------------------------------------------------------------


@app.command("nats-users")
@one_line_errors
def nats_users(
    directory: Annotated[
        Path, typer.Argument(help="Directory of the password files, one per NATS user (0600).")
    ],
    conf: Annotated[
        Path | None,
        typer.Option(
            "--conf",
            help="Write the server's users block here (mode 0600) instead of printing it.",
        ),
    ] = None,
) -> None:
    """The NATS users of an external server: a password file for each (those already there are
    kept), and the nats-server `authorization` block with their bcrypt hashes and permissions.

    Include the block in the server's configuration; point `mctl up` at the directory with
    MC_NATS_CREDENTIALS_DIR, or give each process its user's NATS_USER and NATS_PASSWORD (a
    Kubernetes Secret made from the directory)."""
    from libs.runtime.busauth import authorization_config, bus_permissions, write_credentials
    from libs.runtime.state import write_private

    permissions = bus_permissions(discover())
    passwords = write_credentials(directory, permissions, keep=True)
    block = authorization_config(permissions, passwords)
    if conf is None:
        typer.echo(block, nl=False)
    else:
        write_private(conf, block)
        typer.echo(f"wrote {conf}")
    typer.echo(f"passwords of {', '.join(sorted(permissions))} are in {directory}", err=True)


def _mount_registered() -> None:
    try:
        mount_commands(app, discover())
    except MissionControlError as exc:
        # A broken installation must not take `mctl down` and `mctl status` with it; `mctl up`
        # reports the same problem when the supervisor looks for the services.
        typer.echo(f"warning: {exc}; commands contributed by services are unavailable", err=True)


# At the end, so that a contributed sub-command can never shadow one defined above.
_mount_registered()


if __name__ == "__main__":
    app()
