"""The whole system on SCRAM passwords and one PostgreSQL role per process."""

from __future__ import annotations

import psycopg
import pytest

from libs.eventbus.migrate import login_roles
from libs.runtime.pg_credentials import load_passwords
from tests.e2e.conftest import RunningSystem, wait_for

pytestmark = pytest.mark.e2e


def _logged_in_roles(admin_url: str) -> set[str]:
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_every_process_is_connected_as_its_own_role(whole_system: RunningSystem) -> None:
    # Every service and the relay keep a pool open from the start, so each role has a session.
    expected = set(login_roles().values())
    # Other tests open short administrator sessions (to make tenants); one just closed may still
    # be listed for a moment. A service running as the administrator would stay, and time out.
    seen = wait_for(
        lambda: (
            (r := _logged_in_roles(whole_system.admin_url)) >= expected
            and not r & {"postgres", "mc_service"}
            and r
        ),
        what="a session of every service role, and none as the administrator",
    )
    assert "mc_service" not in seen
    assert "postgres" not in seen  # no service runs as the administrator


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
