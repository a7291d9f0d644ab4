"""Canary reloads, chaos and webhooks through the gateway: an activation's plan, the impact
reports, an operator's abort, a chaos case (sandbox only), webhook subscriptions (admins only,
the secret shown once), and every refusal a clear 4xx."""

from __future__ import annotations

import uuid

import pytest

from libs import policy_bundles as artifacts
from tests.e2e.conftest import RunningSystem
from tests.e2e.test_policy_bundles import _admin_token, _client
from tests.integration.helpers.policy_bundles import KEY_ID, new_key, repo_files, signed

pytestmark = pytest.mark.e2e

NO_RELOAD = "00000000-0000-7000-8000-000000000000"


def test_a_reload_is_a_canary_with_a_report_an_operator_can_abort_and_webhooks_are_admins(
    whole_system: RunningSystem,
) -> None:
    uid = uuid.uuid4().hex[:10]
    tenant = f"canary{uid}"
    api_key = whole_system.key_for(tenant)
    token = _admin_token(whole_system, tenant, uid)
    key = new_key()
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as agent:
        pem = {"public_key": artifacts.public_pem(key)}
        assert admin.put(f"/v1/policy-signing-keys/{KEY_ID}", json=pem).status_code == 200
        digests = []
        for revision in ("1", "2"):
            resp = agent.post("/v1/policy-bundles", content=signed(key, repo_files(revision)))
            assert resp.status_code == 201, resp.text
            digests.append(resp.json()["bundle_digest"])
        first, second = digests

        resp = agent.post(f"/v1/policy-bundles/{first}:activate", json={"immediate": True})
        assert resp.status_code == 200, resp.text
        assert resp.json()["reload"]["status"] == "promoted"
        assert resp.json()["reload"]["reason"] == "immediate"

        # A plan out of bounds is refused by name; nothing is activated.
        resp = agent.post(f"/v1/policy-bundles/{second}:activate", json={"canary": {"percent": 0}})
        assert resp.status_code == 422, resp.text
        assert "percent" in resp.text
        plan = {"percent": 25, "min_decisions": 1000, "min_seconds": 3600}
        resp = agent.post(f"/v1/policy-bundles/{second}:activate", json={"canary": plan})
        assert resp.status_code == 200, resp.text
        reload = resp.json()["reload"]
        assert reload["status"] == "canary" and reload["stable_digest"] == first
        assert reload["plan"]["percent"] == 25
        reload_id = reload["reload_id"]

        live = agent.get(f"/v1/policy-reloads/{reload_id}")
        assert live.status_code == 200, live.text
        assert live.json()["figures"]["canary"]["decisions"] == 0
        listing = agent.get("/v1/policy-reloads", params={"environment": "production"}).json()
        assert [r["status"] for r in listing["reloads"]] == ["canary", "promoted"]

        resp = agent.post(f"/v1/policy-reloads/{reload_id}:abort", json={"reason": "not today"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "rolled_back" and resp.json()["reason"] == "operator"
        resp = agent.post(f"/v1/policy-reloads/{reload_id}:promote")
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["message"].startswith("canary_not_in_progress: ")
        resp = agent.get(f"/v1/policy-reloads/{NO_RELOAD}")
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["message"].startswith("reload_not_found: ")
        assert agent.get("/v1/policy-reloads/not-an-id").status_code == 422

        # Chaos: never in production; in sandbox the engine keeps deciding.
        resp = agent.post(
            "/v1/policy-chaos", json={"case": "expiry_storm", "environment": "production"}
        )
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["message"].startswith("chaos_production_refused: ")
        assert agent.post("/v1/policy-chaos", json={"case": "nope"}).status_code == 422
        resp = agent.post("/v1/policy-chaos", json={"case": "partial_reload_failure"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["kept_deciding"] is True

        # Webhooks: an admin person subscribes; the secret is shown once.
        hook = {"url": "https://hooks.example.com/mc"}
        assert agent.post("/v1/policy-webhooks", json=hook).status_code == 403
        resp = admin.post("/v1/policy-webhooks", json={"url": "ftp://example.com/x"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["message"].startswith("webhook_url_invalid: ")
        resp = admin.post("/v1/policy-webhooks", json=hook)
        assert resp.status_code == 201, resp.text
        made = resp.json()
        assert made["secret"].startswith("whsec_")
        listing = agent.get("/v1/policy-webhooks")
        assert listing.status_code == 200, listing.text
        assert made["secret"] not in listing.text
        assert [w["webhook_id"] for w in listing.json()["webhooks"]] == [made["webhook_id"]]
        resp = admin.delete(f"/v1/policy-webhooks/{made['webhook_id']}")
        assert resp.status_code == 200, resp.text
        resp = admin.delete(f"/v1/policy-webhooks/{made['webhook_id']}")
        assert resp.status_code == 404, resp.text
