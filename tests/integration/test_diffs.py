"""Diffs through the gateway, on two policy-admission replicas against the real event store and
NATS: two uploaded bundles compared, paged in both views, computed again from the stored
request by a replica that never saw it, two agent specs compared, every refusal named, and an
acknowledgement recorded once per person."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from libs import diffing
from libs import policy_bundles as artifacts
from libs.contracts.registry import decode
from services.gateway.keys import create_tenant, issue_key
from services.gateway.users import create_user, grant_role
from services.policy_admission.diffs import Diffs, diff_entity
from services.policy_admission.tenant_bundles import stream_of
from tests.conftest import System
from tests.integration.helpers.policy_bundles import KEY_ID, new_key, repo_files, signed
from tests.integration.test_admission import Admission, running_admission
from tests.integration.test_gateway import Gateway, serve_gateway

pytestmark = pytest.mark.integration

PASSWORD = "a passphrase long enough"
KEY = new_key()


@dataclass
class World:
    gw: Gateway
    a: Admission
    b: Admission


@pytest.fixture(scope="module")
async def world(system: System, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with (
        running_admission(system) as a,
        running_admission(system) as b,
        serve_gateway(system, tmp_path_factory.mktemp("gw-diffs"), None, "gw-diffs") as gw,
    ):
        yield World(gw, a, b)


async def _person(gw: Gateway, tenant: str, role: str) -> dict[str, str]:
    user = f"{role}-{tenant}"
    await create_user(gw.pool, user, PASSWORD, actor="test")
    await grant_role(gw.pool, user, tenant, role, actor="test")
    resp = await gw.http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def _bundles() -> tuple[dict[str, bytes], dict[str, bytes]]:
    old = repo_files(revision="1")
    new = repo_files(revision="2")
    data = json.loads(new["data.json"])
    data["missioncontrol"]["config"]["tenants"]["acme"] = {"max_tokens_per_run": 20_000}
    new["data.json"] = json.dumps(data).encode()
    # A Rego change of 40 lines, so the rows run over several pages.
    new["policies/cost_cap.rego"] += b"".join(b"# note %d\n" % i for i in range(40))
    return old, new


async def _upload(gw: Gateway, admin: dict[str, str], files: dict[str, bytes]) -> str:
    archive = signed(KEY, files)
    resp = await gw.http.post(
        "/v1/policy-bundles",
        params={"environment": "sandbox"},
        content=archive,
        headers={**admin, "Content-Type": "application/gzip"},
        timeout=120,
    )
    assert resp.status_code == 201, resp.text
    return artifacts.archive_digest(archive)


def _error(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"].startswith(reason) or reason in resp.text, resp.text


async def test_two_uploaded_bundles_diffed_paged_and_acknowledged(
    world: World, unique: Callable[[str], str]
) -> None:
    gw = world.gw
    tenant = unique("diff")
    await create_tenant(gw.pool, tenant, actor="test")
    admin = await _person(gw, tenant, "admin")
    viewer = await _person(gw, tenant, "viewer")
    reader = {"Authorization": f"Bearer {await issue_key(gw.pool, tenant, 'r', ['read'])}"}
    pem = {"public_key": artifacts.public_pem(KEY)}
    resp = await gw.http.put(f"/v1/policy-signing-keys/{KEY_ID}", json=pem, headers=admin)
    assert resp.status_code == 200, resp.text
    old_files, new_files = _bundles()
    old, new = await _upload(gw, admin, old_files), await _upload(gw, admin, new_files)

    body = {"old_digest": old, "new_digest": new, "locked_fields": ["cost_cap"], "limit": 10}
    resp = await gw.http.post("/v1/diffs", json=body, headers=reader)
    assert resp.status_code == 200, resp.text
    first = resp.json()
    diff_hash = first["diff_hash"]

    # The same diff as the library computes from the two archives' files.
    expected = diffing.diff_bundles(
        {
            **old_files,
            ".signatures.json": artifacts.extract(signed(KEY, old_files))[".signatures.json"],
        },
        {
            **new_files,
            ".signatures.json": artifacts.extract(signed(KEY, new_files))[".signatures.json"],
        },
        old_digest=old,
        new_digest=new,
        locked=["cost_cap"],
    )
    assert diff_hash == expected.diff_hash
    assert first["old"] == {"bundle_digest": old} and first["new"] == {"bundle_digest": new}
    assert first["summary"] == expected.summary()
    assert first["summary"]["files"] == {"added": 0, "removed": 0, "changed": 4}
    assert first["total"] == len(expected.rows) > 40
    assert len(first["rows"]) == 10 and first["next_cursor"]
    # Listed without its rows: the two bundles compared, its counts, and who asked for it.
    resp = await gw.http.get("/v1/diffs", headers=reader)
    assert resp.status_code == 200, resp.text
    [listed] = resp.json()["diffs"]
    assert (listed["diff_hash"], listed["kind"], listed["old"], listed["new"]) == (
        diff_hash,
        "bundles",
        {"bundle_digest": old},
        {"bundle_digest": new},
    )
    assert listed["summary"] == expected.summary()
    assert listed["requested_by"].startswith("api-key:")

    # Every row once, in order, alternating views and replicas (any replica answers).
    rows, cursor, view = list(first["rows"]), first["next_cursor"], "side-by-side"
    while cursor:
        resp = await gw.http.get(
            f"/v1/diffs/{diff_hash}",
            params={"cursor": cursor, "limit": 7, "view": view},
            headers=reader,
        )
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert page["offset"] == len(rows) and page["diff_hash"] == diff_hash
        rows += page["rows"]
        cursor = page["next_cursor"]
        view = "structured" if view == "side-by-side" else "side-by-side"
    assert [r["index"] for r in rows] == list(range(len(expected.rows)))
    by_file = {r["section"]: r for r in rows if r["kind"] == "file"}
    assert set(by_file) == {".manifest", ".signatures.json", "data.json", "policies/cost_cap.rego"}
    cost = [r for r in rows if r["section"] == "policies/cost_cap.rego"]
    assert len(cost) == 41
    assert all(r["locked"] and r["enforced"] and r["policies"] == ["cost_cap"] for r in cost)
    assert "defines policies: cost_cap" in cost[0]["notes"]
    data = [r for r in rows if r["section"] == "data.json" and r["kind"] == "value"]
    assert [r["path"] for r in data] == ["/missioncontrol/config/tenants/acme"]
    assert data[0]["enforced"] and not data[0]["locked"]

    # A replica that never computed it pages it from the stored request: same hash, same rows.
    admission_store = world.a.store
    tenants = world.a.service.tenants
    assert tenants is not None
    fresh = Diffs(admission_store, tenants.read_archive)
    page = await fresh.get(tenant, diff_hash, cursor=None, limit=1000, view="structured")
    assert page["diff_hash"] == diff_hash and page["total"] == len(expected.rows)

    # Acknowledged by people only, once each.
    ack = f"/v1/diffs/{diff_hash}/acknowledge"
    resp = await gw.http.post(ack, headers=reader)
    assert resp.status_code == 403, resp.text
    resp = await gw.http.post(ack, headers=viewer)
    assert resp.status_code == 200, resp.text
    again = await gw.http.post(ack, headers=viewer)
    assert again.json() == resp.json()
    acks = resp.json()["acknowledgements"]
    assert [a["actor"] for a in acks] == [f"user:viewer-{tenant}"]
    events = [
        decode(e) for e in await gw.store.read_stream(stream_of(tenant, diff_entity(diff_hash)))
    ]
    asked = await world.b.rpc.call(
        "admission", "diff_acknowledgements", {"tenant_id": tenant, "diff_hash": diff_hash}
    )
    assert asked == resp.json()
    assert [(e.event_type, e.diff_hash, e.acknowledged_by) for e in events] == [  # type: ignore[attr-defined]
        ("policy.diff_acknowledged", diff_hash, f"user:viewer-{tenant}")
    ]

    # Refusals, each named; another tenant sees neither the bundles nor the diff.
    other = unique("other")
    await create_tenant(gw.pool, other, actor="test")
    stranger = {"Authorization": f"Bearer {await issue_key(gw.pool, other, 'r', ['read'])}"}
    resp = await gw.http.post("/v1/diffs", json=body, headers=stranger)
    _error(resp, 404, "bundle_not_found")
    resp = await gw.http.get(f"/v1/diffs/{diff_hash}", headers=stranger)
    _error(resp, 404, "diff_not_found")
    resp = await gw.http.get("/v1/diffs", headers=stranger)
    assert resp.status_code == 200 and resp.json()["diffs"] == [], resp.text
    missing = {**body, "new_digest": "sha256:" + "e" * 64}
    _error(await gw.http.post("/v1/diffs", json=missing, headers=reader), 404, "bundle_not_found")
    both = {**body, "old_spec": {}, "new_spec": {}}
    _error(await gw.http.post("/v1/diffs", json=both, headers=reader), 422, "diff_inputs_invalid")
    half = {"old_digest": old}
    _error(await gw.http.post("/v1/diffs", json=half, headers=reader), 422, "diff_inputs_invalid")
    bad_cursor = diffing.encode_cursor("sha256:" + "f" * 64, 3)
    resp = await gw.http.get(
        f"/v1/diffs/{diff_hash}", params={"cursor": bad_cursor}, headers=reader
    )
    _error(resp, 422, "diff_cursor_invalid")
    for limit in (0, 1001):
        resp = await gw.http.get(f"/v1/diffs/{diff_hash}", params={"limit": limit}, headers=reader)
        _error(resp, 422, "limit")
    resp = await gw.http.get(f"/v1/diffs/{diff_hash}", params={"view": "unified"}, headers=reader)
    _error(resp, 422, "view")
    resp = await gw.http.post(f"/v1/diffs/sha256:{'d' * 64}/acknowledge", headers=viewer)
    _error(resp, 404, "diff_not_found")


async def test_two_agent_specs_diffed_with_locked_fields_and_bounds(
    world: World, unique: Callable[[str], str]
) -> None:
    gw = world.gw
    tenant = unique("spec")
    await create_tenant(gw.pool, tenant, actor="test")
    reader = {"Authorization": f"Bearer {await issue_key(gw.pool, tenant, 'r', ['read'])}"}
    old = {
        "limits": {"max_tokens": 1000},
        "tools": ["search"],
        "rows": {str(i): i for i in range(2000)},
    }
    new = {"limits": {"max_tokens": 5000}, "tools": ["search", "shell"], "rows": {}}
    body = {
        "old_spec": old,
        "new_spec": new,
        "locked_fields": ["limits.max_tokens"],
        "enforced_fields": ["/tools"],
        "view": "side-by-side",
        "limit": 3,
    }
    resp = await gw.http.post("/v1/diffs", json=body, headers=reader)
    assert resp.status_code == 200, resp.text
    page = resp.json()
    expected = diffing.diff_documents(
        old, new, locked_fields=["limits.max_tokens"], enforced_fields=["/tools"]
    )
    assert page["diff_hash"] == expected.diff_hash
    assert page["summary"]["rows"] == 2002 and page["summary"]["locked"] == 1
    first = page["rows"][0]
    assert (first["path"], first["locked"], first["notes"]) == (
        "/limits/max_tokens",
        True,
        ["locked: limits.max_tokens"],
    )
    assert first["left"]["text"] == "1000" and first["right"]["text"] == "5000"
    # The same request again: the same hash.
    again = await gw.http.post("/v1/diffs", json=body, headers=reader)
    assert again.json()["diff_hash"] == page["diff_hash"]

    big = {"blob": "x" * (2 * 1024 * 1024)}
    resp = await gw.http.post("/v1/diffs", json={"old_spec": {}, "new_spec": big}, headers=reader)
    _error(resp, 413, "diff_document_too_large")
    raw = '{"old_spec": {"a": "\\ud800"}, "new_spec": {}}'
    resp = await gw.http.post(
        "/v1/diffs", content=raw, headers={**reader, "Content-Type": "application/json"}
    )
    assert resp.status_code == 422, resp.text
    resp = await gw.http.post(
        "/v1/diffs", json={"old_spec": {"a": 2**60}, "new_spec": {}}, headers=reader
    )
    _error(resp, 422, "diff_value_unsupported")
    assert json.loads(json.dumps(page))  # the answer is plain JSON
