"""Promotion requests end to end, through the gateway of a whole running system: an agent
promoted into the sandbox (the write tier: no approval by default) and into production (the
irreversible tier: one approver), approved by a person other than its requester, executed with
the policy set recorded; requests made stale by a changed agent or policy set refused; and an
open high incident freezing execution until it is resolved; a bundle activated after a
request making it stale, and drift between the environments blocking execution until
acknowledged."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from libs import policy_bundles as artifacts
from tests.e2e.conftest import RunningSystem, mctl, wait_for
from tests.e2e.test_agents import SPEC, _admit, _error
from tests.e2e.test_policy_bundles import PASSWORD, _admin_token, _client
from tests.integration.helpers.policy_bundles import new_key, repo_files, signed

pytestmark = pytest.mark.e2e


def _person(system: RunningSystem, tenant: str, user: str, role: str) -> str:
    db = ("--database-url", system.admin_url)
    made = subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", "user", "create", user, "--password-stdin", *db],
        capture_output=True,
        text=True,
        timeout=120,
        input=f"{PASSWORD}\n",
    )
    assert made.returncode == 0, made.stderr
    mctl("user", "grant", user, tenant, role, *db)
    with httpx.Client(base_url=system.gateway_url, timeout=30) as http:
        resp = http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["access_token"])


def _tenant(
    system: RunningSystem, prefix: str
) -> tuple[str, str, str, tuple[httpx.Client, httpx.Client, httpx.Client]]:
    """A new tenant: the gateway, its suffix, an API key, and clients of an admin person, an
    approver person and the key."""
    uid = uuid.uuid4().hex[:10]
    tenant = f"{prefix}{uid}"
    base = system.gateway_url
    api_key = system.key_for(tenant)
    admin = _client(base, _admin_token(system, tenant, uid))
    approver = _client(base, _person(system, tenant, f"{prefix}-approver-{uid}", "approver"))
    return base, uid, api_key, (admin, approver, _client(base, api_key))


def _request(http: httpx.Client, agent_id: str, version: int, environment: str) -> dict[str, Any]:
    body = {
        "agent_id": agent_id,
        "version": version,
        "environment": environment,
        "diff_hash": "sha256:reviewed-diff",
        "reason": "ready for real tickets",
    }
    resp = http.post("/v1/promotions/requests", json=body)
    assert resp.status_code == 201, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _high_incident(key: httpx.Client, environment: str) -> str:
    """Open a high-severity incident in ``environment``: a step over the token limit."""
    run_id = key.post("/v1/runs", json={"agent_id": f"greedy-{environment}"}).json()["run_id"]
    resp = key.post(
        f"/v1/runs/{run_id}/admissions",
        json={
            "step_index": 1,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 50_000},
            "environment": environment,
        },
    )
    assert resp.status_code == 200 and resp.json()["outcome"] == "deny", resp.text
    return str(run_id)


def _freeze(http: httpx.Client, environment: str) -> dict[str, Any]:
    environments = _ok(http.get("/v1/policy-freeze"))["environments"]
    found: list[dict[str, Any]] = [e for e in environments if e["environment"] == environment]
    assert len(found) == 1, environments
    return found[0]


def test_a_promotion_requested_approved_by_another_person_and_executed_through_the_gateway(
    whole_system: RunningSystem,
) -> None:
    _, uid, _, clients = _tenant(whole_system, "promote")
    agent_id = f"triage-{uid}"
    with clients[0] as admin, clients[1] as approver, clients[2] as key:
        resp = key.post("/v1/agents/draft", json={"agent_id": agent_id, "spec": SPEC})
        assert resp.status_code == 201, resp.text

        # Into the sandbox: the write tier gates nothing by default, so the request is
        # approved at once and its requester (an agent's key) executes it.
        to_sandbox = _request(key, agent_id, 1, "sandbox")
        assert (to_sandbox["tier"], to_sandbox["status"]) == ("write", "approved")
        done = _ok(key.post(f"/v1/promotions/requests/{to_sandbox['promotion_id']}/execute"))
        assert done["status"] == "executed" and done["executed"]["agent_version"] == 1
        assert _ok(key.get(f"/v1/agents/{agent_id}"))["state"] == "sandbox"

        # Into production: the irreversible tier needs one approver, a person, not the
        # requester.
        _error(
            admin.post(
                "/v1/promotions/requests",
                json={"agent_id": agent_id, "version": 7, "environment": "production"},
            ),
            409,
            "promotion_version_mismatch",
        )
        request = _request(admin, agent_id, 1, "production")
        pid = request["promotion_id"]
        assert (request["tier"], request["status"], request["pending"]) == (
            "irreversible",
            "pending",
            True,
        )
        assert request["approval"]["required"] == 1
        assert request["diff_acknowledged"] is True
        assert request["policy_set_hash"].startswith("sha256:")
        _error(admin.post(f"/v1/promotions/requests/{pid}/execute"), 409, "promotion_pending")
        refused = admin.post(f"/v1/promotions/requests/{pid}/approve", json={"reason": "mine"})
        _error(refused, 403, "promotion_self_approval")
        by_key = key.post(f"/v1/promotions/requests/{pid}/approve", json={"reason": "a key"})
        assert by_key.status_code == 403, by_key.text
        assert (
            approver.post("/v1/promotions/requests/not-a-uuid/approve", json={}).status_code == 422
        )
        _error(
            key.get("/v1/promotions/requests/0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            404,
            "promotion_not_found",
        )

        waiting = _ok(key.get("/v1/promotions/requests", params={"pending": "true"}))
        assert [p["promotion_id"] for p in waiting["promotions"]] == [pid]
        approved = _ok(
            approver.post(f"/v1/promotions/requests/{pid}/approve", json={"reason": "reviewed"})
        )
        assert approved["status"] == "approved"
        mine = _ok(
            key.get(
                "/v1/promotions/requests",
                params={"approver_id": approved["approval"]["approvers"][0], "agent_id": agent_id},
            )
        )
        assert [p["promotion_id"] for p in mine["promotions"]] == [pid]

        executed = _ok(admin.post(f"/v1/promotions/requests/{pid}/execute"))
        assert executed["status"] == "executed"
        agent = _ok(key.get(f"/v1/agents/{agent_id}"))
        assert (agent["state"], agent["version"]) == ("governed", 2)
        assert executed["executed"]["agent_version"] == 2
        assert executed["executed"]["policy_digest"] == agent["governed"]["policy_digest"]
        assert executed["executed"]["policy_set_hash"] == agent["governed"]["policy_set_hash"]
        assert executed["executed"]["policy_set_hash"] == request["policy_set_hash"]
        wait_for(
            lambda: _admit(key, agent_id, "production")["outcome"] == "allow",
            what="the promoted agent admitted in production",
        )
        # Executing again changes nothing.
        _error(admin.post(f"/v1/promotions/requests/{pid}/execute"), 409, "promotion_executed")

        timeline = _ok(key.get(f"/v1/promotions/requests/{pid}/events"))["events"]
        assert [e["event_type"] for e in timeline] == [
            "promotion.requested",
            "promotion.approved",
            "promotion.executed",
        ]
        assert timeline[0]["actor"].startswith("user:policy-admin-")
        assert timeline[1]["actor"] == f"user:promote-approver-{uid}"
        assert all(e["occurred_at"] for e in timeline)

        # A request whose agent changed before approval goes stale at approve.
        assert _ok(key.post(f"/v1/agents/{agent_id}/fork"))["version"] == 3
        assert _ok(key.post(f"/v1/agents/{agent_id}/sandbox"))["state"] == "sandbox"
        second = _request(admin, agent_id, 3, "production")["promotion_id"]
        edited = {**SPEC, "role": "Sorts and answers tickets"}
        assert key.post("/v1/agents/draft", json={"agent_id": agent_id, "spec": edited}).is_success
        stale = approver.post(f"/v1/promotions/requests/{second}/approve", json={"reason": "ok"})
        _error(stale, 409, "promotion_stale")
        shown = _ok(key.get(f"/v1/promotions/requests/{second}"))
        assert shown["stale"] is True
        assert shown["stale_reasons"][0].startswith("agent_changed: ")

        # An approved request whose policy set changed before execution goes stale at execute.
        assert _ok(key.post(f"/v1/agents/{agent_id}/sandbox"))["state"] == "sandbox"
        third = _request(admin, agent_id, 3, "production")["promotion_id"]
        _ok(approver.post(f"/v1/promotions/requests/{third}/approve", json={"reason": "ok"}))
        settings = key.put("/v1/policy-settings", json={"max_tokens_per_run": 20000})
        assert settings.status_code == 200, settings.text
        _error(admin.post(f"/v1/promotions/requests/{third}/execute"), 409, "promotion_stale")
        shown = _ok(key.get(f"/v1/promotions/requests/{third}"))
        assert shown["stale"] is True
        assert shown["stale_reasons"][0].startswith("policy_set_changed: ")
        assert _ok(key.get(f"/v1/agents/{agent_id}"))["version"] == 3  # not promoted

        # An open high incident in production freezes execution until it is resolved.
        fourth = _request(admin, agent_id, 3, "production")["promotion_id"]
        _ok(approver.post(f"/v1/promotions/requests/{fourth}/approve", json={"reason": "ok"}))
        _high_incident(key, "production")
        production = wait_for(
            lambda: (e := _freeze(key, "production"))["frozen"] and e,
            what="the production freeze",
        )
        (incident,) = production["incidents"]
        assert incident["severity"] == "high"
        frozen = admin.post(f"/v1/promotions/requests/{fourth}/execute")
        _error(frozen, 409, "promotion_frozen")
        assert incident["incident_id"] in frozen.json()["error"]["message"]
        assert _ok(key.get(f"/v1/promotions/requests/{fourth}"))["status"] == "approved"
        resp = key.post(
            f"/v1/incidents/{incident['incident_id']}/resolve",
            json={"resolution": "limit raised", "by": "oncall"},
        )
        assert resp.status_code == 200, resp.text
        thawed = wait_for(
            lambda: (
                (r := admin.post(f"/v1/promotions/requests/{fourth}/execute")).status_code == 200
                and r.json()
            ),
            what="the execution once the incident is resolved",
        )
        assert thawed["status"] == "executed"
        assert thawed["executed"]["agent_version"] == 4
        assert _ok(key.get(f"/v1/agents/{agent_id}"))["governed"]["version"] == 4


def test_a_bundle_activated_after_the_request_makes_it_stale_and_drift_blocks_execution(
    whole_system: RunningSystem,
) -> None:
    base, uid, api_key, clients = _tenant(whole_system, "promodrift")
    agent_id = f"drifter-{uid}"
    signing_key = new_key()
    archive = signed(signing_key, repo_files(revision="7"), key_id="release")
    with clients[0] as admin, clients[1] as approver, clients[2] as key:
        assert key.post("/v1/agents/draft", json={"agent_id": agent_id, "spec": SPEC}).is_success
        assert _ok(key.post(f"/v1/agents/{agent_id}/sandbox"))["state"] == "sandbox"
        first = _request(admin, agent_id, 1, "production")

        # A production bundle of the tenant's own is activated after the request.
        pem = {"public_key": artifacts.public_pem(signing_key)}
        assert admin.put("/v1/policy-signing-keys/release", json=pem).status_code == 200
        resp = key.post(
            "/v1/policy-bundles",
            params={"environment": "production"},
            content=archive,
            headers={"Content-Type": "application/gzip"},
        )
        assert resp.status_code == 201, resp.text
        digest = resp.json()["bundle_digest"]
        activated = key.post(
            "/v1/policy-bundles:activate",
            params={"environment": "production", "digest": digest},
            json={"immediate": True},
        )
        assert activated.status_code == 200, activated.text

        pid = first["promotion_id"]
        refused = approver.post(f"/v1/promotions/requests/{pid}/approve", json={"reason": "ok"})
        _error(refused, 409, "promotion_stale")
        shown = _ok(key.get(f"/v1/promotions/requests/{pid}"))
        assert shown["stale"] is True
        assert shown["stale_reasons"][0].startswith("bundle_changed: ")
        assert digest in shown["stale_reasons"][0]

        # A request made under the new bundle: sandbox and production now differ, and until
        # an admin acknowledges the drift, execution is refused naming it.
        second = _request(admin, agent_id, 1, "production")
        assert second["policy_digest"] == digest
        pid = second["promotion_id"]
        _ok(approver.post(f"/v1/promotions/requests/{pid}/approve", json={"reason": "ok"}))
        _error(admin.post(f"/v1/promotions/requests/{pid}/execute"), 409, "promotion_drifted")
        fingerprint = _ok(admin.post("/v1/policy-drift:check"))["recorded"]["fingerprint"]
        resp = admin.post(
            "/v1/policy-drift:acknowledge",
            json={"reason": "production tries a lower limit", "fingerprint": fingerprint},
        )
        assert resp.status_code == 200, resp.text
        executed = _ok(admin.post(f"/v1/promotions/requests/{pid}/execute"))
        assert executed["executed"]["policy_digest"] == digest
        assert _ok(key.get(f"/v1/agents/{agent_id}"))["governed"]["policy_digest"] == digest

        listed = mctl("promotion", "list", "--url", base, "--api-key", api_key, "--agent", agent_id)
        assert f"{pid} {agent_id} v1 → production (irreversible): executed" in listed
        assert "stale: bundle_changed" in listed
