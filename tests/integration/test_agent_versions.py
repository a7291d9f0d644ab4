"""An agent's stored versions through the gateway, on two policy-admission replicas against the
real event store and NATS: a draft saved twice, promoted, forked and edited is listed newest
first with what made each version and which one production runs; each version's spec is read
back and two of them are diffed; an unknown agent or version, and a version below 1, are
refused by name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from libs.contracts.agents import spec_hash
from services.gateway.keys import create_tenant, issue_key
from tests.conftest import System
from tests.integration.test_admission import running_admission
from tests.integration.test_agent_registry import SPEC
from tests.integration.test_diffs import _person
from tests.integration.test_gateway import Gateway, serve_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def gw(system: System, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with (
        running_admission(system),
        running_admission(system),
        serve_gateway(system, tmp_path_factory.mktemp("gw-agent-versions"), None, "gw-av") as gw,
    ):
        yield gw


def _ok(resp: httpx.Response) -> Any:
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def _error(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"].startswith(reason), resp.text


async def test_versions_are_listed_read_back_and_diffed_through_the_gateway(
    gw: Gateway, unique: Callable[[str], str]
) -> None:
    http = gw.http
    tenant = unique("versions")
    await create_tenant(gw.pool, tenant, actor="test")
    admin = await _person(gw, tenant, "admin")
    reader = {"Authorization": f"Bearer {await issue_key(gw.pool, tenant, 'r', ['read'])}"}
    _ok(await http.put("/v1/approval-rules", json={"irreversible": {"required": 0}}, headers=admin))
    agent_id = unique("triage-")
    base = f"/v1/agents/{agent_id}"

    async def draft(spec: dict[str, Any]) -> Any:
        return _ok(
            await http.post(
                "/v1/agents/draft", json={"agent_id": agent_id, "spec": spec}, headers=admin
            )
        )

    first, saved = {**SPEC, "role": "A first try"}, SPEC
    edited = {**SPEC, "role": "Sorts and answers incoming tickets"}
    await draft(first)
    await draft(saved)  # version 1 saved a second time: this is its spec
    _ok(await http.post(f"{base}/sandbox", headers=admin))
    assert _ok(await http.post(f"{base}/promote", headers=admin))["version"] == 2
    assert _ok(await http.post(f"{base}/fork", headers=admin))["version"] == 3
    assert (await draft(edited))["version"] == 3

    # A key that may read agents reads their versions: newest first, without the specs.
    listing = _ok(await http.get(f"{base}/versions", headers=reader))
    assert (listing["agent_id"], listing["version"], listing["state"]) == (agent_id, 3, "draft")
    assert listing["governed_version"] == 2
    rows = [
        (v["version"], v["made_by"], v["from_version"], v["current"], v["governed"], v["spec_hash"])
        for v in listing["versions"]
    ]
    assert rows == [
        (3, "draft", 2, True, False, spec_hash(edited)),
        (2, "promote", 1, False, True, spec_hash(saved)),
        (1, "draft", None, False, False, spec_hash(saved)),
    ]
    assert all("spec" not in v and v["saved_at"] for v in listing["versions"])

    # Each version's spec, with its hash.
    specs = {}
    for version, spec in ((1, saved), (2, saved), (3, edited)):
        one = _ok(await http.get(f"{base}/versions/{version}", headers=reader))
        assert (one["version"], one["spec"], one["spec_hash"]) == (version, spec, spec_hash(spec))
        specs[version] = one["spec"]
    current = _ok(await http.get(base, headers=reader))
    assert current["spec"] == specs[3] and current["spec_hash"] == spec_hash(edited)

    # The governed version against the newest: the diff shows the one field that changed.
    body = {"old_spec": specs[2], "new_spec": specs[3]}
    diff = _ok(await http.post("/v1/diffs", json=body, headers=reader))
    assert [(r["path"], r["change"]) for r in diff["rows"]] == [("/role", "changed")]
    assert diff["old"] == {"document": spec_hash(saved)}

    # Refusals, each named.
    _error(
        await http.get(f"/v1/agents/{agent_id}-ghost/versions", headers=reader),
        404,
        "agent_not_found: ",
    )
    _error(
        await http.get(f"/v1/agents/{agent_id}-ghost/versions/1", headers=reader),
        404,
        "agent_not_found: ",
    )
    _error(
        await http.get(f"{base}/versions/4", headers=reader),
        404,
        f"agent_version_not_found: agent {agent_id!r} has no version 4; its versions are 1 to 3",
    )
    for bad in ("0", "-1", "two", str(2**31)):
        resp = await http.get(f"{base}/versions/{bad}", headers=reader)
        _error(resp, 422, "invalid request: path.version: ")
    # Another tenant does not see the agent.
    other = unique("versions-other")
    await create_tenant(gw.pool, other, actor="test")
    stranger = {"Authorization": f"Bearer {await issue_key(gw.pool, other, 'r', ['read'])}"}
    _error(await http.get(f"{base}/versions", headers=stranger), 404, "agent_not_found: ")
