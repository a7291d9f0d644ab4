"""The tenant's past policy simulations and diffs, listed through the gateway against a real
policy-admission, event store and NATS: newest first, by status, a page at a time by cursor
with no row repeated or skipped (rows of the same instant included), a cursor not made by the
listing refused by name, and each tenant seeing only its own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from libs.eventbus.db import transaction
from services.gateway.keys import create_tenant, issue_key
from services.gateway.users import create_user, grant_role
from tests.conftest import System
from tests.integration.test_admission import Admission, running_admission
from tests.integration.test_gateway import Gateway, serve_gateway

pytestmark = pytest.mark.integration

PASSWORD = "a passphrase long enough"
DIGEST = "sha256:" + "cd" * 32
T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


@dataclass
class World:
    gw: Gateway
    admission: Admission


@pytest.fixture(scope="module")
async def world(system: System, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with (
        running_admission(system) as admission,
        serve_gateway(system, tmp_path_factory.mktemp("gw-history"), None, "gw-history") as gw,
    ):
        yield World(gw, admission)


async def _reader(gw: Gateway, tenant: str) -> dict[str, str]:
    await create_tenant(gw.pool, tenant, exist_ok=True, actor="test")
    return {"Authorization": f"Bearer {await issue_key(gw.pool, tenant, 'r', ['read'])}"}


async def _person(gw: Gateway, tenant: str, user: str) -> dict[str, str]:
    await create_user(gw.pool, user, PASSWORD, actor="test")
    await grant_role(gw.pool, user, tenant, "viewer", actor="test")
    resp = await gw.http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def _report(flipped: int) -> dict[str, Any]:
    """A done job's report, its per-policy and per-decision rows included."""
    return {
        "bundle_digest": DIGEST,
        "decisions": 40,
        "flipped": flipped,
        "waived": 1,
        "errors": 0,
        "runs_stopped": 2,
        "prevented_cost_usd": "1.25",
        "policies": [{"policy_id": "cost_cap", "flipped": flipped}],
        "stopped_runs": [{"run_id": "r1"}],
        "flipped_decisions": [{"decision_id": f"d{i}"} for i in range(flipped)],
    }


async def _job(world: World, tenant: str, status: str, created_at: datetime) -> str:
    """A simulation job as policy-admission keeps it, created at ``created_at``. Its heartbeat
    is in the future, so no replica takes an unfinished one over while the test reads it."""
    simulation_id = str(uuid.uuid4())
    request = {
        "bundle_digest": DIGEST,
        "since": "2026-11-01T00:00:00+00:00",
        "until": "2026-11-02T00:00:00+00:00",
        "environment": "sandbox",
        "agent_id": None,
    }
    report = _report(flipped=3) if status == "done" else None
    async with transaction(world.admission.store.pool) as conn:
        await conn.execute(
            "INSERT INTO policy_admission.simulations (simulation_id, tenant_id, request,"
            " requested_by, status, progress, report, error, created_at, updated_at,"
            " heartbeat_at) VALUES (%s, %s, %s, 'user:someone', %s, %s, %s, %s, %s, %s,"
            " now() + interval '1 day')",
            (
                simulation_id, tenant, orjson.dumps(request).decode(), status,
                orjson.dumps({"decisions": 40, "fraction": 1.0}).decode(),
                orjson.dumps(report).decode() if report else None,
                "bundle_not_found: gone" if status == "failed" else None,
                created_at, created_at,
            ),
        )  # fmt: skip
    return simulation_id


async def _walk(
    world: World, path: str, items: str, key: str, headers: dict[str, str], **params: Any
) -> list[list[str]]:
    """Every page of a listing, following its cursors: the ids (``key``) of each page's
    ``items``."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = await world.gw.http.get(path, params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        pages.append([item[key] for item in answer[items]])
        cursor = answer["next_cursor"]
        if cursor is None:
            return pages


def _refused(resp: Any, needle: str) -> None:
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "invalid_input", resp.text
    assert needle in resp.json()["error"]["message"], resp.text


async def test_simulations_listed_newest_first_by_status_and_page_without_repeats_or_gaps(
    world: World, unique: Callable[[str], str]
) -> None:
    tenant, other = unique("sims"), unique("sims-other")
    reader = await _reader(world.gw, tenant)
    stranger = await _reader(world.gw, other)
    # Nine jobs over five instants: five share one instant, so their ids order them.
    same = T0 + timedelta(minutes=2)
    plan = [
        ("done", T0),
        ("failed", T0 + timedelta(minutes=1)),
        ("done", same),
        ("running", same),
        ("queued", same),
        ("failed", same),
        ("done", same),
        ("done", T0 + timedelta(minutes=3)),
        ("running", T0 + timedelta(minutes=4)),
    ]
    jobs = [(await _job(world, tenant, status, at), status, at) for status, at in plan]
    theirs = await _job(world, other, "done", T0 + timedelta(minutes=5))
    newest_first = [j for j, _, _ in sorted(jobs, key=lambda j: (j[2], j[0]), reverse=True)]
    statuses = {j: status for j, status, _ in jobs}

    resp = await world.gw.http.get("/v1/policy-simulations", headers=reader)
    assert resp.status_code == 200, resp.text
    listing = resp.json()
    assert [s["simulation_id"] for s in listing["simulations"]] == newest_first
    assert listing["next_cursor"] is None
    # Without reports; a done job's totals as its summary, the others' summary null.
    by_id = {s["simulation_id"]: s for s in listing["simulations"]}
    done = by_id[jobs[0][0]]
    assert "report" not in done
    assert done["summary"] == {
        "decisions": 40,
        "flipped": 3,
        "waived": 1,
        "errors": 0,
        "runs_stopped": 2,
        "prevented_cost_usd": "1.25",
    }
    assert done["request"]["bundle_digest"] == DIGEST
    assert done["request"]["environment"] == "sandbox"
    assert done["requested_by"] == "user:someone"
    assert done["progress"] == {"decisions": 40, "fraction": 1.0}
    assert done["created_at"] == T0.isoformat()
    assert by_id[jobs[1][0]]["summary"] is None
    assert by_id[jobs[1][0]]["error"] == "bundle_not_found: gone"

    # Page by page, two at a time: every job once, in the same order.
    pages = await _walk(
        world, "/v1/policy-simulations", "simulations", "simulation_id", reader, limit=2
    )
    assert [len(p) for p in pages] == [2, 2, 2, 2, 1]
    assert [s for p in pages for s in p] == newest_first

    # By status, paged one at a time.
    for status in ("done", "running", "queued", "failed"):
        wanted = [j for j in newest_first if statuses[j] == status]
        pages = await _walk(
            world,
            "/v1/policy-simulations",
            "simulations",
            "simulation_id",
            reader,
            status=status,
            limit=1,
        )
        assert [s for p in pages for s in p] == wanted

    # Each tenant sees its own only.
    pages = await _walk(world, "/v1/policy-simulations", "simulations", "simulation_id", stranger)
    assert pages == [[theirs]]

    # Refusals, named: a cursor the listing did not make, bad characters, limits, a status.
    for params, needle in (
        # base64url of "not-a-cursor"
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor is not one a listing of simulations returned"),
        ({"cursor": "a cursor!"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"status": "finished"}, "status"),
    ):
        resp = await world.gw.http.get("/v1/policy-simulations", params=params, headers=reader)
        _refused(resp, needle)


async def _diff(world: World, headers: dict[str, str], n: int) -> str:
    body = {"old_spec": {"n": n, "name": "a"}, "new_spec": {"n": n + 1, "name": "b"}}
    resp = await world.gw.http.post("/v1/diffs", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["diff_hash"])


async def test_diffs_listed_most_recently_asked_first_and_paged_without_repeats_or_gaps(
    world: World, unique: Callable[[str], str]
) -> None:
    tenant, other = unique("diffs"), unique("diffs-other")
    reader = await _reader(world.gw, tenant)
    stranger = await _reader(world.gw, other)
    hashes = [await _diff(world, reader, n) for n in range(5)]
    newest_first = hashes[::-1]

    resp = await world.gw.http.get("/v1/diffs", headers=reader)
    assert resp.status_code == 200, resp.text
    listing = resp.json()
    assert [d["diff_hash"] for d in listing["diffs"]] == newest_first
    first = listing["diffs"][-1]
    assert "rows" not in first
    assert first["kind"] == "documents"
    assert set(first["old"]) == {"document"} and first["old"]["document"].startswith("sha256:")
    assert first["old"] != first["new"]
    assert first["summary"] == {
        "rows": 2,
        "added": 0,
        "removed": 0,
        "changed": 2,
        "locked": 0,
        "enforced": 0,
    }
    assert first["requested_by"].startswith("api-key:")
    assert first["requested_at"] == first["created_at"]

    pages = await _walk(world, "/v1/diffs", "diffs", "diff_hash", reader, limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [d for p in pages for d in p] == newest_first

    # The same diff asked for again, by a person: the same row, now first, naming them.
    user = unique("asker-")
    person = await _person(world.gw, tenant, user)
    assert await _diff(world, person, 0) == hashes[0]
    listing = (await world.gw.http.get("/v1/diffs", headers=reader)).json()
    assert [d["diff_hash"] for d in listing["diffs"]] == [hashes[0], *newest_first[:-1]]
    again = listing["diffs"][0]
    assert again["requested_by"] == f"user:{user}"
    assert again["created_at"] == first["created_at"]
    assert datetime.fromisoformat(again["requested_at"]) > datetime.fromisoformat(
        again["created_at"]
    )

    # Another tenant asking for the very same diff has its own row; neither sees the other's.
    assert await _diff(world, stranger, 1) == hashes[1]
    theirs = (await world.gw.http.get("/v1/diffs", headers=stranger)).json()
    assert [d["diff_hash"] for d in theirs["diffs"]] == [hashes[1]]
    ours = (await world.gw.http.get("/v1/diffs", headers=reader)).json()
    assert len(ours["diffs"]) == 5
    assert (
        next(d for d in ours["diffs"] if d["diff_hash"] == hashes[1])["requested_by"]
        == (first["requested_by"])
    )

    # A cursor of the other listing is refused by name.
    for minute in (1, 2):
        await _job(world, tenant, "done", T0 + timedelta(minutes=minute))
    resp = await world.gw.http.get("/v1/policy-simulations", params={"limit": 1}, headers=reader)
    sim_cursor = resp.json()["next_cursor"]
    assert sim_cursor
    resp = await world.gw.http.get("/v1/diffs", params={"cursor": sim_cursor}, headers=reader)
    _refused(resp, "cursor is not one a listing of diffs returned")
    for limit in (0, 201):
        resp = await world.gw.http.get("/v1/diffs", params={"limit": limit}, headers=reader)
        _refused(resp, "limit")
