"""The agent registry end to end, through the gateway of a whole running system: a draft saved
and autosaved by an agent's key, validated with named problems, sandboxed, promoted by an admin
(never by a key), forked and disabled; admissions of its runs following each state."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import RunningSystem, mctl, wait_for
from tests.e2e.test_policy_bundles import _admin_token, _client

pytestmark = pytest.mark.e2e

SPEC: dict[str, Any] = {
    "identity": {"name": "Support triage", "owner": "team-support"},
    "role": "Sorts support tickets",
    "model": {"model": "gpt-4o"},
    "tools": [{"name": "search"}],
}


def _admit(http: httpx.Client, agent_id: str, environment: str) -> dict[str, Any]:
    run_id = http.post("/v1/runs", json={"agent_id": agent_id}).json()["run_id"]
    resp = http.post(
        f"/v1/runs/{run_id}/admissions",
        json={
            "step_index": 1,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10},
            "environment": environment,
        },
    )
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _tenant(system: RunningSystem, prefix: str) -> tuple[str, str, str]:
    """A new tenant: an agent id to use there, an API key and an admin's token."""
    uid = uuid.uuid4().hex[:10]
    tenant = f"agents{prefix}{uid}"
    return f"{prefix}-{uid}", system.key_for(tenant), _admin_token(system, tenant, uid)


def _error(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"].startswith(f"{reason}: "), resp.text


def test_an_agent_from_draft_to_governed_to_disabled_through_the_gateway(
    whole_system: RunningSystem,
) -> None:
    agent_id, api_key, token = _tenant(whole_system, "triage")
    uid = agent_id.removeprefix("triage-")
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as key:
        draft = {"agent_id": agent_id, "spec": SPEC, "origin": "template", "origin_ref": "tpl-1"}
        resp = key.post("/v1/agents/draft", json=draft)
        assert resp.status_code == 201, resp.text
        assert resp.json()["version"] == 1 and resp.json()["state"] == "draft"
        resp = key.post("/v1/agents/draft", json=draft)
        assert resp.status_code == 200 and resp.json()["changed"] is False  # autosave, same spec
        edited = {**draft, "spec": {**SPEC, "role": "Sorts tickets"}}
        resp = key.post("/v1/agents/draft", json=edited)
        assert resp.status_code == 200 and resp.json()["changed"] is True, resp.text
        assert key.post("/v1/agents/draft", json=draft).json()["version"] == 1

        # Bad input is a named 4xx.
        bad = {"agent_id": agent_id, "spec": {"colour": "red"}}
        _error(key.post("/v1/agents/draft", json=bad), 422, "agent_draft_invalid")
        assert key.post("/v1/agents/draft", json={**draft, "agent_id": "a/b"}).status_code == 422
        _error(key.get(f"/v1/agents/ghost-{uid}"), 404, "agent_not_found")
        checked = key.post("/v1/agents/validate", json={"spec": {"role": "half a spec"}})
        assert checked.status_code == 200, checked.text
        assert checked.json()["passed"] is False
        assert {"identity", "model"} <= {p["path"] for p in checked.json()["problems"]}
        # The bundle's on_create_attempt hook is part of validation: no owner, no agent.
        ownerless = {**SPEC, "identity": {"name": "Nobody's"}}
        checked = key.post("/v1/agents/validate", json={"spec": ownerless}).json()
        assert checked["passed"] is False
        assert [p["code"] for p in checked["problems"]] == ["policy_agent_owner"]

        # A draft runs in the sandbox only.
        denied = _admit(key, agent_id, "production")
        assert denied["outcome"] == "deny"
        assert denied["reasons"][0]["policy_id"] == "agent_state"
        assert _admit(key, agent_id, "sandbox")["outcome"] == "allow"

        assert key.post(f"/v1/agents/{agent_id}/promote").status_code == 403  # people only
        # Production's approval tier needs an approval by default: no direct promotion then.
        _error(admin.post(f"/v1/agents/{agent_id}/promote"), 409, "promotion_requires_approval")
        _approvals_off(admin)
        _error(admin.post(f"/v1/agents/{agent_id}/promote"), 409, "agent_illegal_transition")
        resp = key.post(f"/v1/agents/{agent_id}/sandbox")
        assert resp.status_code == 200 and resp.json()["state"] == "sandbox", resp.text
        resp = admin.post(f"/v1/agents/{agent_id}/promote")
        assert resp.status_code == 200, resp.text
        promoted = resp.json()
        assert (promoted["version"], promoted["state"]) == (2, "governed")
        assert promoted["governed"]["policy_set_hash"].startswith("sha256:")
        assert promoted["governed"]["promoted_by"].startswith("user:policy-admin-")
        wait_for(
            lambda: _admit(key, agent_id, "production")["outcome"] == "allow",
            what="the governed agent admitted in production",
        )

        # Governed is immutable; fork opens version 3; production keeps version 2.
        changed = {**draft, "spec": {**SPEC, "role": "Sorts and answers tickets"}}
        _error(key.post("/v1/agents/draft", json=changed), 409, "agent_version_immutable")
        resp = key.post(f"/v1/agents/{agent_id}/fork")
        assert resp.status_code == 200 and resp.json()["version"] == 3, resp.text
        assert key.post("/v1/agents/draft", json=changed).status_code == 200
        view = key.get(f"/v1/agents/{agent_id}").json()
        assert view["environments"]["production"] == {"state": "governed", "version": 2}
        assert view["origin"] == {"type": "template", "ref": "tpl-1"}
        actions = key.get(f"/v1/agents/{agent_id}/actions").json()
        assert actions["tools"] == ["search"] and "sandbox" in actions["lifecycle_actions"]

        # Disabled: denied everywhere.
        assert key.post(f"/v1/agents/{agent_id}/disable", json={"reason": "x"}).status_code == 403
        resp = admin.post(f"/v1/agents/{agent_id}/disable", json={"reason": "incident 12"})
        assert resp.status_code == 200 and resp.json()["state"] == "disabled", resp.text
        for environment in ("sandbox", "production"):
            result = wait_for(
                lambda e=environment: (a := _admit(key, agent_id, e))["outcome"] == "deny" and a,
                what=f"denied in {environment}",
            )
            assert (
                result["reasons"][0]["message"]
                == f"agent {agent_id!r} is disabled in {environment}"
            )
        _error(key.post(f"/v1/agents/{agent_id}/sandbox"), 409, "agent_disabled")
        listing = key.get("/v1/agent-registry", params={"state": "disabled"}).json()
        assert [a["agent_id"] for a in listing["agents"]] == [agent_id]


def _approvals_off(admin: httpx.Client) -> None:
    """The tenant's production tier needs no approval, so an admin may promote directly."""
    resp = admin.put("/v1/approval-rules", json={"irreversible": {"required": 0}})
    assert resp.status_code == 200, resp.text


def test_mctl_agent_saves_sandboxes_promotes_and_shows_an_agent(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    agent_id, api_key, token = _tenant(whole_system, "cli")
    spec = tmp_path / "agent.yaml"
    spec.write_text(
        "identity: {name: CLI agent, owner: team-cli}\n"
        "role: Answers questions\nmodel: {model: gpt-4o}\n"
    )
    base = {**os.environ, "MC_GATEWAY_URL": whole_system.gateway_url}
    as_key = {**base, "MC_API_KEY": api_key}
    as_admin = {**base, "MC_API_KEY": token}

    saved = json.loads(
        mctl("agent", "draft", agent_id, str(spec), "--origin", "import", env=as_key)
    )
    assert (saved["version"], saved["origin"]["type"]) == (1, "import")
    verdict = json.loads(mctl("agent", "validate", agent_id, "-e", "sandbox", env=as_key))
    assert verdict["passed"] is True and verdict["policy_set_hash"].startswith("sha256:")
    assert json.loads(mctl("agent", "sandbox", agent_id, env=as_key))["state"] == "sandbox"
    with _client(whole_system.gateway_url, token) as admin:
        _approvals_off(admin)
    promoted = json.loads(mctl("agent", "promote", agent_id, env=as_admin))
    assert (promoted["version"], promoted["state"]) == (2, "governed")
    shown = json.loads(mctl("agent", "show", agent_id, env=as_key))
    assert shown["environments"]["production"] == {"state": "governed", "version": 2}
    listed = json.loads(mctl("agent", "list", "--state", "governed", env=as_key))
    assert [a["agent_id"] for a in listed["agents"]] == [agent_id]
