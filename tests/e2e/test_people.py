"""A person, end to end: ``mctl user create``, sign in, act through the API, be named the actor of
what they did, and be shut out the moment they are disabled."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest

from tests.e2e.conftest import RunningSystem, mctl, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "a passphrase long enough"


def _mctl_with_stdin(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_a_user_made_with_mctl_signs_in_and_is_the_actor_of_what_they_do(
    whole_system: RunningSystem,
) -> None:
    uid = uuid.uuid4().hex[:10]
    tenant, user = f"people{uid}", f"ann-{uid}"
    db = ("--database-url", whole_system.admin_url)
    mctl("tenant", "create", tenant, *db)
    made = _mctl_with_stdin(f"{PASSWORD}\n", "user", "create", user, "--password-stdin", *db)
    assert made.returncode == 0, made.stderr
    assert PASSWORD not in made.stdout + made.stderr
    mctl("user", "grant", user, tenant, "admin", *db)
    listed = mctl("user", "list", *db)
    assert any(user in line and f"{tenant}: admin" in line for line in listed.splitlines())

    with httpx.Client(base_url=whole_system.gateway_url, timeout=30) as http:
        resp = http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
        run = http.post("/v1/runs", json={"agent_id": "hand-driven"}, headers=auth)
        assert run.status_code == 201, run.text
        prices = {"prices": [{"model": "m-e2e", "input_per_token": 1, "output_per_token": 2}]}
        resp = http.put("/v1/prices", json=prices, headers=auth)
        assert resp.status_code == 200, resp.text

        with psycopg.connect(whole_system.admin_url) as conn:
            rows = conn.execute(
                "SELECT event_type, actor FROM eventstore.events WHERE tenant_id = %s "
                "AND event_type IN ('run.started', 'cost.price_table_published')",
                (tenant,),
            ).fetchall()
            grants = conn.execute(
                "SELECT event_type, actor FROM eventstore.events WHERE stream_id = %s",
                (f"{tenant}/user/{user}",),
            ).fetchall()
        assert sorted(rows) == [
            ("cost.price_table_published", f"user:{user}"),
            ("run.started", f"user:{user}"),
        ]
        assert grants == [("user.role_granted", "mctl")]

        # Disabled from the command line: the running gateway refuses the token within a second.
        mctl("user", "disable", user, *db)
        disabled_at = time.monotonic()
        wait_for(
            lambda: http.get("/v1/auth/whoami", headers=auth).status_code == 401,
            timeout=1.0,
            interval=0.01,
            what="the disabled user's token refused",
        )
        assert time.monotonic() - disabled_at < 1.0
