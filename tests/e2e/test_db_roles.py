"""The whole system on SCRAM passwords and one PostgreSQL role per process."""

from __future__ import annotations

import psycopg
import pytest

from libs.eventbus.migrate import login_roles
from libs.runtime.pg_credentials import load_passwords
from tests.e2e.conftest import RunningSystem, wait_for

pytestmark = pytest.mark.e2e


def _sessions(admin_url: str) -> list[tuple[str, str]]:
    """(application_name, role) of every other session on the database."""
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT application_name, usename FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [(str(r[0] or ""), str(r[1])) for r in rows]


def _process_of(application_name: str, names: set[str]) -> str | None:
    """The process a session belongs to (``gateway-2`` is a replica of ``gateway``)."""
    for name in names:
        if application_name == name or application_name.startswith(f"{name}-"):
            return name
    return None


def test_every_process_is_connected_as_its_own_role(whole_system: RunningSystem) -> None:
    # The supervisor names each child's sessions after it (PGAPPNAME); other tests' short
    # administrator sessions carry no such name, so they do not count either way.
    roles = login_roles()

    def every_process_connected() -> list[tuple[str, str, str]] | None:
        by_process = [
            (process, app, role)
            for app, role in _sessions(whole_system.admin_url)
            if (process := _process_of(app, set(roles))) is not None
        ]
        return by_process if {p for p, _, _ in by_process} >= set(roles) else None

    sessions = wait_for(every_process_connected, what="a session of every service and the relay")
    wrong = [(app, role) for process, app, role in sessions if role != roles[process]]
    assert wrong == [], f"sessions not under their process's own role: {wrong}"
    assert not {role for _, _, role in sessions} & {"postgres", "mc_service"}


def test_no_database_password_is_written_to_a_log_or_the_state_file(
    whole_system: RunningSystem,
) -> None:
    passwords = [p.get_secret_value() for p in load_passwords(whole_system.data_dir).values()]
    assert len(passwords) == len(set(login_roles().values())) + 1  # and the administrator's
    files = [whole_system.data_dir / "state.json", *whole_system.data_dir.rglob("*.log")]
    assert len(files) > 1
    for path in files:
        text = path.read_text(errors="replace")
        assert not [p for p in passwords if p in text], f"a database password is in {path}"
