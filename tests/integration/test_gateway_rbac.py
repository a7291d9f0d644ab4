"""Roles and scopes on the real gateway app: every route × every role and every key scope, tenants
kept apart, revocation within a second, people named as the actors of what they do, and every
change to people and keys on the record.

The gateway runs in-process as in ``test_gateway.py`` (same wiring and stand-ins), with an
operator token so that the admin route's outcome depends on the role or scope alone, and with an
external OIDC provider (a JWKS file this module writes) beside its own tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from psycopg_pool import AsyncConnectionPool

from libs.contracts import stream_id_for
from services.gateway.entrypoints import build_router, build_well_known_router, permission_table
from services.gateway.keys import KeyVerifier, create_tenant, issue_key, revoke_key
from services.gateway.rbac import ROLES, RULES, SCOPES, Permission
from services.gateway.users import (
    SYSTEM_TENANT,
    create_user,
    disable_user,
    grant_role,
    revoke_role,
)
from tests.conftest import System, wait_until
from tests.integration.test_gateway import Gateway, serve_gateway

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "rbac-operator-token"
PASSWORD = "correct horse battery staple"
IDP = "https://idp.rbac.test/"
IDP_AUDIENCE = "mc-rbac-test"
NO_RUN = "rbac-no-such-run"
NO_RELOAD = "00000000-0000-7000-8000-000000000000"
NO_INCIDENT = "0193e1a0-0000-7000-8000-000000000000"
SIGN_IN_USER = f"sign-in-{time.time_ns()}"
PRICES = {"prices": [{"model": "m", "input_per_token": 1, "output_per_token": 1}]}


def _not_started() -> NoReturn:
    raise RuntimeError("only the routes are read here")


ROUTES = permission_table(
    build_router(_not_started, _not_started), build_well_known_router(_not_started)
)
CALLERS = [*ROLES, *(f"key:{s}" for s in SCOPES)]

# One request per route: (path, JSON body). Valid enough to get past validation where the
# caller is allowed; what the services answer then does not matter here, only that it is not
# 401 or 403.
PERIOD = "2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z"
PROMOTION = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
SAMPLES: dict[tuple[str, str], tuple[str, Any]] = {
    ("POST", "/v1/auth/token"): (
        "/v1/auth/token",
        {"username": SIGN_IN_USER, "password": PASSWORD},
    ),
    ("GET", "/v1/auth/whoami"): ("/v1/auth/whoami", None),
    ("POST", "/v1/runs"): ("/v1/runs", {"agent_id": "rbac-agent"}),
    ("POST", "/v1/runs/{run_id}/admissions"): (
        f"/v1/runs/{NO_RUN}/admissions",
        {"step_index": 1},
    ),
    ("POST", "/v1/runs/{run_id}/steps"): (f"/v1/runs/{NO_RUN}/steps", {"step_index": 1}),
    ("POST", "/v1/steps:batch"): (
        "/v1/steps:batch",
        {"items": [{"run_id": NO_RUN, "step_index": 1}]},
    ),
    ("POST", "/v1/runs/{run_id}/finish"): (f"/v1/runs/{NO_RUN}/finish", {"status": "completed"}),
    ("POST", "/v1/runs/{run_id}/steps/{step_index}/usage"): (
        f"/v1/runs/{NO_RUN}/steps/1/usage",
        {"input_tokens": 10, "output_tokens": 2},
    ),
    ("GET", "/v1/runs/{run_id}/events"): (f"/v1/runs/{NO_RUN}/events", None),
    ("GET", "/v1/runs"): ("/v1/runs", None),
    ("GET", "/v1/runs/{run_id}"): (f"/v1/runs/{NO_RUN}", None),
    ("GET", "/v1/runs/{run_id}/trace"): (f"/v1/runs/{NO_RUN}/trace", None),
    ("GET", "/v1/runs/{run_id}/replay"): (f"/v1/runs/{NO_RUN}/replay", None),
    ("GET", "/v1/runs/{run_id}/export"): (f"/v1/runs/{NO_RUN}/export", None),
    ("GET", "/v1/audit/search"): ("/v1/audit/search?q=budget", None),
    # An out-of-bounds heartbeat: 422 once allowed, so the stream never opens here.
    ("GET", "/v1/live"): ("/v1/live?heartbeat_s=0", None),
    ("GET", "/v1/analytics/{view}"): ("/v1/analytics/productivity?days=7", None),
    ("GET", "/v1/statements"): ("/v1/statements", None),
    ("GET", "/v1/statements/{period}"): ("/v1/statements/2026-01", None),
    ("GET", "/v1/api-keys"): ("/v1/api-keys", None),
    ("POST", "/v1/api-keys"): ("/v1/api-keys", {"name": "rbac sample", "scopes": ["read"]}),
    ("POST", "/v1/api-keys/{key_id}:revoke"): ("/v1/api-keys/nosuchkey000:revoke", None),
    ("GET", "/v1/members"): ("/v1/members", None),
    ("GET", "/v1/incidents"): ("/v1/incidents", None),
    ("GET", "/v1/evidence/soc2"): (f"/v1/evidence/soc2?from={PERIOD}&format=json", None),
    ("POST", "/v1/evidence/soc2/jobs"): (
        "/v1/evidence/soc2/jobs",
        {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "format": "json"},
    ),
    ("GET", "/v1/evidence/soc2/jobs/{job_id}"): (f"/v1/evidence/soc2/jobs/{NO_RELOAD}", None),
    ("GET", "/v1/evidence/soc2/jobs/{job_id}/download"): (
        f"/v1/evidence/soc2/jobs/{NO_RELOAD}/download",
        None,
    ),
    ("GET", "/v1/incidents/{incident_id}/debrief"): (
        f"/v1/incidents/{NO_INCIDENT}/debrief",
        None,
    ),
    ("GET", "/v1/debriefs"): (f"/v1/debriefs?from={PERIOD}&format=md", None),
    ("POST", "/v1/attestations"): (
        "/v1/attestations",
        {"standard": "soc2", "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"},
    ),
    ("GET", "/v1/attestations"): ("/v1/attestations", None),
    ("GET", "/v1/attestations/{attestation_id}"): (f"/v1/attestations/{PROMOTION}", None),
    ("GET", "/v1/incidents/{incident_id}"): (f"/v1/incidents/{NO_INCIDENT}", None),
    ("POST", "/v1/incidents/{incident_id}/acknowledge"): (
        f"/v1/incidents/{NO_INCIDENT}/acknowledge",
        {},
    ),
    ("POST", "/v1/incidents/{incident_id}/resolve"): (
        f"/v1/incidents/{NO_INCIDENT}/resolve",
        {"resolution": "fixed"},
    ),
    ("GET", "/v1/policies"): ("/v1/policies", None),
    ("GET", "/v1/costs"): ("/v1/costs", None),
    ("GET", "/v1/prices"): ("/v1/prices", None),
    ("PUT", "/v1/prices"): ("/v1/prices", PRICES),
    ("POST", "/v1/admin/rebuild-projections"): ("/v1/admin/rebuild-projections", None),
    ("GET", "/.well-known/jwks.json"): ("/.well-known/jwks.json", None),
    ("POST", "/v1/agents"): ("/v1/agents", {"agent_id": "rbac-agent"}),
    ("GET", "/v1/agents"): ("/v1/agents", None),
    ("POST", "/v1/agents/{agent_id}/work:take"): ("/v1/agents/rbac-agent/work:take?wait_s=0", None),
    ("POST", "/v1/workflows"): ("/v1/workflows", {"name": "nope", "steps": []}),
    ("GET", "/v1/workflows"): ("/v1/workflows", None),
    ("GET", "/v1/workflows/{workflow_id}"): ("/v1/workflows/nope", None),
    ("GET", "/v1/workflows/{workflow_id}/diff"): ("/v1/workflows/nope/diff?from_version=1", None),
    ("POST", "/v1/workflows/{workflow_id}/executions"): ("/v1/workflows/nope/executions", {}),
    ("GET", "/v1/executions"): ("/v1/executions", None),
    ("GET", "/v1/executions/{execution_id}"): (f"/v1/executions/{NO_RUN}", None),
    ("GET", "/v1/executions/{execution_id}/events"): (f"/v1/executions/{NO_RUN}/events", None),
    ("POST", "/v1/executions/{execution_id}/abort"): (
        f"/v1/executions/{NO_RUN}/abort",
        {"reason": "rbac probe"},
    ),
    ("POST", "/v1/executions/{execution_id}/steps/{step_id}/approve"): (
        f"/v1/executions/{NO_RUN}/steps/nope/approve",
        {"reason": "rbac probe"},
    ),
    ("POST", "/v1/executions/{execution_id}/steps/{step_id}/reject"): (
        f"/v1/executions/{NO_RUN}/steps/nope/reject",
        {"reason": "rbac probe"},
    ),
    ("GET", "/v1/approvals"): ("/v1/approvals", None),
    ("PUT", "/v1/budgets"): (
        "/v1/budgets",
        {"scope": "tenant", "window": "month", "cap_usd": "100"},
    ),
    ("GET", "/v1/budgets"): ("/v1/budgets", None),
    ("PUT", "/v1/budgets/timezone"): ("/v1/budgets/timezone", {"timezone": "Europe/Paris"}),
    ("GET", "/v1/approval-rules"): ("/v1/approval-rules", None),
    ("PUT", "/v1/approval-rules"): ("/v1/approval-rules", {"irreversible": {"required": 1}}),
    ("POST", "/v1/policy-bundles"): ("/v1/policy-bundles?environment=sandbox", None),
    ("GET", "/v1/policy-bundles"): ("/v1/policy-bundles", None),
    ("POST", "/v1/policy-bundles/{digest}:activate"): (
        f"/v1/policy-bundles/sha256:{'0' * 64}:activate?environment=sandbox",
        None,
    ),
    ("POST", "/v1/policy-bundles:activate"): ("/v1/policy-bundles:activate", None),
    ("GET", "/v1/policy-signing-keys"): ("/v1/policy-signing-keys", None),
    ("PUT", "/v1/policy-signing-keys/{key_id}"): (
        "/v1/policy-signing-keys/rbac-key",
        {"public_key": "not a PEM key"},
    ),
    ("POST", "/v1/policy-signing-keys/{key_id}:retire"): (
        "/v1/policy-signing-keys/rbac-key:retire",
        None,
    ),
    ("GET", "/v1/policy-settings"): ("/v1/policy-settings", None),
    ("PUT", "/v1/policy-settings"): ("/v1/policy-settings", {"max_tokens_per_run": 100000}),
    ("POST", "/v1/policy-exceptions"): (
        "/v1/policy-exceptions",
        {
            "policy_id": "tool_allowlist",
            "agent_id": "rbac-agent",
            "reason": "rbac sample",
            "expires_at": "2000-01-01T00:00:00Z",
        },
    ),
    ("POST", "/v1/agents/draft"): (
        "/v1/agents/draft",
        {"agent_id": "rbac-registry-agent", "spec": {"role": "reviews"}},
    ),
    ("POST", "/v1/agents/validate"): (
        "/v1/agents/validate",
        {"spec": {"role": "reviews"}, "environment": "sandbox"},
    ),
    ("GET", "/v1/agent-registry"): ("/v1/agent-registry?state=draft", None),
    ("GET", "/v1/agents/{agent_id}"): ("/v1/agents/rbac-registry-agent", None),
    ("GET", "/v1/agents/{agent_id}/actions"): ("/v1/agents/rbac-registry-agent/actions", None),
    ("GET", "/v1/agents/{agent_id}/versions"): ("/v1/agents/rbac-registry-agent/versions", None),
    ("GET", "/v1/agents/{agent_id}/versions/{version}"): (
        "/v1/agents/rbac-registry-agent/versions/1",
        None,
    ),
    ("POST", "/v1/agents/{agent_id}/sandbox"): ("/v1/agents/rbac-registry-agent/sandbox", None),
    ("POST", "/v1/agents/{agent_id}/fork"): ("/v1/agents/rbac-registry-agent/fork", None),
    ("POST", "/v1/agents/{agent_id}/promote"): ("/v1/agents/rbac-registry-agent/promote", None),
    ("POST", "/v1/agents/{agent_id}/disable"): (
        "/v1/agents/rbac-registry-agent/disable",
        {"environments": ["sandbox"], "reason": "rbac check"},
    ),
    ("GET", "/v1/policy-exceptions"): ("/v1/policy-exceptions?status=open", None),
    ("GET", "/v1/policy-reloads"): ("/v1/policy-reloads?environment=sandbox", None),
    ("GET", "/v1/policy-reloads/{reload_id}"): (f"/v1/policy-reloads/{NO_RELOAD}", None),
    ("POST", "/v1/policy-reloads/{reload_id}:promote"): (
        f"/v1/policy-reloads/{NO_RELOAD}:promote",
        None,
    ),
    ("POST", "/v1/policy-reloads/{reload_id}:abort"): (
        f"/v1/policy-reloads/{NO_RELOAD}:abort",
        {"reason": "rbac probe"},
    ),
    ("POST", "/v1/policy-webhooks"): ("/v1/policy-webhooks", {"url": "http://127.0.0.1:9/x"}),
    ("GET", "/v1/policy-webhooks"): ("/v1/policy-webhooks", None),
    ("POST", "/v1/policy-chaos"): (
        "/v1/policy-chaos",
        {"case": "partial_reload_failure", "environment": "production"},
    ),
    ("DELETE", "/v1/policy-webhooks/{webhook_id}"): (f"/v1/policy-webhooks/{NO_RELOAD}", None),
    ("POST", "/v1/policy-hooks/{hook}/evaluate"): (
        "/v1/policy-hooks/on_review_open/evaluate",
        {"agent": {"id": "rbac-agent", "identity": {"owner": "team-a"}}},
    ),
    ("POST", "/v1/policy-exceptions/{exception_id}:revoke"): (
        "/v1/policy-exceptions/rbac-exception:revoke",
        None,
    ),
    ("POST", "/v1/promotions/requests"): (
        "/v1/promotions/requests",
        {"agent_id": "rbac-registry-agent", "version": 1, "environment": "production"},
    ),
    ("GET", "/v1/promotions/requests"): ("/v1/promotions/requests?pending=true", None),
    ("GET", "/v1/promotions/requests/{promotion_id}"): (
        f"/v1/promotions/requests/{PROMOTION}",
        None,
    ),
    ("GET", "/v1/promotions/requests/{promotion_id}/events"): (
        f"/v1/promotions/requests/{PROMOTION}/events",
        None,
    ),
    ("POST", "/v1/promotions/requests/{promotion_id}/approve"): (
        f"/v1/promotions/requests/{PROMOTION}/approve",
        {"reason": "rbac sample"},
    ),
    ("POST", "/v1/promotions/requests/{promotion_id}/reject"): (
        f"/v1/promotions/requests/{PROMOTION}/reject",
        {"reason": "rbac sample"},
    ),
    ("POST", "/v1/promotions/requests/{promotion_id}/execute"): (
        f"/v1/promotions/requests/{PROMOTION}/execute",
        None,
    ),
    ("GET", "/v1/policy-drift"): ("/v1/policy-drift", None),
    ("POST", "/v1/policy-drift:check"): ("/v1/policy-drift:check", None),
    ("POST", "/v1/policy-drift:acknowledge"): (
        "/v1/policy-drift:acknowledge",
        {"reason": "rbac sample"},
    ),
    ("POST", "/v1/policy-drift:align"): ("/v1/policy-drift:align", {"source": "sandbox"}),
    ("GET", "/v1/policy-freeze"): ("/v1/policy-freeze", None),
    ("POST", "/v1/policy-freeze/{environment}:override"): (
        "/v1/policy-freeze/production:override",
        {"reason": "rbac sample"},
    ),
    ("POST", "/v1/diffs"): ("/v1/diffs", {"old_spec": {"a": 1}, "new_spec": {"a": 2}}),
    ("GET", "/v1/diffs"): ("/v1/diffs", None),
    ("GET", "/v1/diffs/{diff_hash}"): (f"/v1/diffs/sha256:{'0' * 64}", None),
    ("POST", "/v1/diffs/{diff_hash}/acknowledge"): (
        f"/v1/diffs/sha256:{'0' * 64}/acknowledge",
        None,
    ),
    ("POST", "/v1/policy-simulations"): (
        "/v1/policy-simulations",
        {
            "bundle_digest": f"sha256:{'0' * 64}",
            "since": "2026-11-01T00:00:00Z",
            "until": "2026-11-02T00:00:00Z",
        },
    ),
    ("GET", "/v1/policy-simulations"): ("/v1/policy-simulations", None),
    ("GET", "/v1/policy-simulations/{simulation_id}"): (
        "/v1/policy-simulations/00000000-0000-0000-0000-000000000000",
        None,
    ),
    ("GET", "/v1/runs/{run_id}/full-export"): (f"/v1/runs/{NO_RUN}/full-export", None),
    ("GET", "/v1/executions/{execution_id}/replay"): (f"/v1/executions/{NO_RUN}/replay", None),
    ("GET", "/v1/executions/{execution_id}/full-export"): (
        f"/v1/executions/{NO_RUN}/full-export",
        None,
    ),
    ("POST", "/v1/exports"): ("/v1/exports", {"subject_type": "run", "subject_id": NO_RUN}),
    ("GET", "/v1/exports"): ("/v1/exports", None),
    ("GET", "/v1/exports/{job_id}"): (f"/v1/exports/{NO_RELOAD}", None),
    ("GET", "/v1/exports/{job_id}/download"): (f"/v1/exports/{NO_RELOAD}/download", None),
}


@dataclass
class World:
    """The gateway, a tenant with one user per role and one key per scope, and the provider."""

    gw: Gateway
    tenant: str
    other: str
    creds: dict[str, dict[str, str]]
    idp_key: ec.EllipticCurvePrivateKey

    def idp_token(self, sub: str, roles: Any, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": IDP,
            "aud": IDP_AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "mc_roles": roles,
        }
        return jwt.encode({**body, **claims}, self.idp_key, "ES256", headers={"kid": "idp-1"})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _login(gw: Gateway, user: str, password: str = PASSWORD) -> httpx.Response:
    return await gw.http.post("/v1/auth/token", json={"username": user, "password": password})


async def _user(
    gw: Gateway, user: str, grants: list[tuple[str, str]], password: str = PASSWORD
) -> dict[str, str]:
    """Create ``user`` with ``grants`` (tenant, role), sign in, and return the auth header."""
    await create_user(gw.pool, user, password, actor="test")
    for tenant, role in grants:
        await grant_role(gw.pool, user, tenant, role, actor="test")
    resp = await _login(gw, user, password)
    assert resp.status_code == 200, resp.text
    return _bearer(resp.json()["access_token"])


@pytest.fixture(scope="module")
async def world(system: System, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    idp_key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(idp_key.public_key(), as_dict=True)
    jwks = tmp_path_factory.mktemp("idp") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1", "alg": "ES256"}]}))
    async with serve_gateway(
        system,
        tmp_path_factory.mktemp("gw-rbac"),
        ADMIN_TOKEN,
        "gw-rbac",
        MC_OIDC_ISSUER=IDP,
        MC_OIDC_AUDIENCE=IDP_AUDIENCE,
        MC_OIDC_JWKS_FILE=str(jwks),
    ) as gw:
        suffix = str(time.time_ns())[-9:]
        tenant, other = f"rbac-a{suffix}", f"rbac-b{suffix}"
        creds: dict[str, dict[str, str]] = {}
        for t in (tenant, other):
            await create_tenant(gw.pool, t, actor="test")
        await create_user(gw.pool, SIGN_IN_USER, PASSWORD, actor="test")
        for role in ROLES:
            creds[role] = await _user(gw, f"{role}-{suffix}", [(tenant, role)])
        for scope in SCOPES:
            key = await issue_key(gw.pool, tenant, f"only {scope}", [scope], actor="test")
            creds[f"key:{scope}"] = _bearer(key)
        yield World(gw, tenant, other, creds, idp_key)


# --- every route × every role and scope -----------------------------------------------------------


def test_every_route_has_a_sample_request() -> None:
    assert {(m, p) for m, p, _ in ROUTES} == set(SAMPLES)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    ("method", "path", "permission"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES]
)
async def test_route_by_role_and_scope(
    world: World, method: str, path: str, permission: Permission, caller: str
) -> None:
    url, body = SAMPLES[(method, path)]
    headers = {**world.creds[caller], "X-Admin-Token": ADMIN_TOKEN}
    resp = await world.gw.http.request(method, url, json=body, headers=headers)
    rule = RULES[permission]
    allowed = caller in rule.roles or caller.removeprefix("key:") in rule.scopes
    if allowed:
        assert resp.status_code not in (401, 403), resp.text
        return
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "forbidden"
    if caller.startswith("key:") and not rule.scopes:
        assert "API keys may not" in error["message"]  # people's permissions only
    elif caller.startswith("key:"):
        assert "lacks the scope" in error["message"]
    else:
        assert f"(held: {caller})" in error["message"]
        assert world.tenant in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "permission"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES]
)
async def test_route_without_credentials(
    world: World, method: str, path: str, permission: Permission
) -> None:
    url, body = SAMPLES[(method, path)]
    bad = [{}, _bearer("eyJhbGciOiJub25lIn0.e30."), _bearer("not-a-token")]
    for headers in bad:
        resp = await world.gw.http.request(method, url, json=body, headers=headers)
        if permission is Permission.PUBLIC:
            assert resp.status_code not in (401, 403), resp.text
        else:
            assert resp.status_code == 401, (headers, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"


# --- tenants --------------------------------------------------------------------------------------


async def test_a_user_of_one_tenant_cannot_act_in_another(world: World) -> None:
    gw, a, b = world.gw, world.tenant, world.other
    creds = await _user(gw, f"ops-{a}", [(a, "operator")])
    key_b = _bearer(await issue_key(gw.pool, b, "b's agent", actor="test"))
    resp = await gw.http.post("/v1/runs", json={"agent_id": "b-agent"}, headers=key_b)
    assert resp.status_code == 201, resp.text
    run_b = resp.json()["run_id"]
    probes: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/runs/{run_b}", None),
        ("POST", "/v1/runs", {"agent_id": "x"}),
        ("POST", f"/v1/runs/{run_b}/steps", {"step_index": 1}),
        ("POST", f"/v1/runs/{run_b}/finish", {"status": "failed"}),
        ("PUT", "/v1/prices", PRICES),
        ("GET", "/v1/auth/whoami", None),
    ]
    for method, url, body in probes:
        # Naming the other tenant: refused before anything reaches a service.
        resp = await gw.http.request(method, url, json=body, headers={**creds, "X-Tenant-Id": b})
        assert resp.status_code == 403, (url, resp.text)
        assert f"holds no role in tenant {b!r}" in resp.json()["error"]["message"]
        # A key of A naming B, likewise.
        resp = await gw.http.request(
            method, url, json=body, headers={**world.creds["key:read"], "X-Tenant-Id": b}
        )
        assert resp.status_code == 403, (url, resp.text)
    # Without naming it, the user acts in their own tenant, where B's run does not exist.
    for method, url, body in probes[:1] + probes[2:4]:
        resp = await gw.http.request(method, url, json=body, headers=creds)
        assert resp.status_code == 404, (url, resp.text)
    events = await gw.store.read_stream(stream_id_for(b, "run", run_b))
    assert [e.event_type for e in events] == ["run.started"]


async def test_a_user_of_several_tenants_names_one_and_gets_that_tenants_role(
    world: World,
) -> None:
    gw, a, b = world.gw, world.tenant, world.other
    creds = await _user(gw, f"multi-{a}", [(a, "operator"), (b, "viewer")])
    resp = await gw.http.get("/v1/auth/whoami", headers=creds)
    assert resp.status_code == 422
    assert "X-Tenant-Id" in resp.json()["error"]["message"]
    in_a = {**creds, "X-Tenant-Id": a}
    in_b = {**creds, "X-Tenant-Id": b}
    assert (await gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=in_a)).status_code == 201
    resp = await gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=in_b)
    assert resp.status_code == 403
    who = (await gw.http.get("/v1/auth/whoami", headers=in_b)).json()
    assert (who["tenant_id"], who["roles"], who["kind"]) == (b, ["viewer"], "user")


# --- signing in and the gateway's own key set -----------------------------------------------------


async def test_signing_in_and_the_published_key_set(world: World) -> None:
    gw = world.gw
    user = f"signin-{world.tenant}"
    await _user(gw, user, [(world.tenant, "viewer")])
    resp = await _login(gw, user)
    token = resp.json()["access_token"]
    assert resp.json()["tenants"] == {world.tenant: ["viewer"]}
    assert resp.json()["expires_in"] == 900
    # The token verifies against the key set the gateway publishes, as any verifier would.
    jwks = (await gw.http.get("/.well-known/jwks.json")).json()
    [key] = jwt.PyJWKSet.from_dict(jwks).keys
    assert key.key_id == jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="mission-control")
    assert claims["sub"] == user
    assert claims["exp"] - claims["iat"] == 900
    # Wrong passwords, unknown users and malformed names get one and the same answer.
    answers = [
        await _login(gw, user, "wrong password!!"),
        await _login(gw, f"nobody-{world.tenant}"),
    ]
    for resp in answers:
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == answers[0].json()["error"]["message"]
    resp = await _login(gw, "bad name with spaces")
    assert resp.status_code == 422
    assert PASSWORD not in resp.text


async def test_an_external_providers_token_is_honoured_by_its_roles_claim(world: World) -> None:
    gw, a = world.gw, world.tenant
    sub = f"ext-{a}@example.test"
    viewer = _bearer(world.idp_token(sub, {a: ["viewer"]}))
    who = (await gw.http.get("/v1/auth/whoami", headers=viewer)).json()
    assert (who["actor"], who["tenant_id"], who["roles"]) == (f"user:{sub}", a, ["viewer"])
    resp = await gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=viewer)
    assert resp.status_code == 403
    groups = _bearer(world.idp_token(sub, [f"{a}:operator", "staff"]))
    resp = await gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=groups)
    assert resp.status_code == 201, resp.text
    # Another audience, or a token the provider did not sign, is refused.
    wrong_aud = _bearer(world.idp_token(sub, {a: ["admin"]}, aud="another-api"))
    assert (await gw.http.get("/v1/auth/whoami", headers=wrong_aud)).status_code == 401
    forged = jwt.encode(
        {
            "iss": IDP,
            "aud": IDP_AUDIENCE,
            "sub": sub,
            "iat": 0,
            "exp": 2**40,
            "mc_roles": {a: "admin"},
        },
        ec.generate_private_key(ec.SECP256R1()),
        "ES256",
        headers={"kid": "idp-1"},
    )
    assert (await gw.http.get("/v1/auth/whoami", headers=_bearer(forged))).status_code == 401


# --- revocation -----------------------------------------------------------------------------------


async def _refused_within_one_second(
    gw: Gateway, probe: Callable[[], Any], status: int, what: str
) -> float:
    started = time.monotonic()

    async def refused() -> bool:
        resp = await probe()
        return bool(resp.status_code == status)

    await wait_until(refused, timeout=1.0, interval=0.01, what=what)
    return time.monotonic() - started


async def test_a_disabled_users_tokens_are_refused_within_a_second(world: World) -> None:
    gw, a = world.gw, world.tenant
    user = f"leaver-{a}"
    creds = await _user(gw, user, [(a, "admin")])
    ext_sub = f"ext-leaver-{a}"
    await create_user(gw.pool, ext_sub, PASSWORD, actor="test")
    external = _bearer(world.idp_token(ext_sub, {a: ["admin"]}))
    for headers in (creds, external):
        # Accepted first, so the user is in the gateway's cache (valid for 30 s).
        assert (await gw.http.get("/v1/auth/whoami", headers=headers)).status_code == 200
    await disable_user(gw.pool, user, actor="test")
    await disable_user(gw.pool, ext_sub, actor="test")
    for headers in (creds, external):
        took = await _refused_within_one_second(
            gw, lambda h=headers: gw.http.get("/v1/auth/whoami", headers=h), 401, "disabled"
        )
        assert took < 1.0
    resp = await gw.http.get("/v1/auth/whoami", headers=creds)
    assert "disabled" in resp.json()["error"]["message"]
    assert (await _login(gw, user)).status_code == 401


async def test_a_revoked_role_stops_within_a_second(world: World) -> None:
    gw, a = world.gw, world.tenant
    user = f"demoted-{a}"
    creds = await _user(gw, user, [(a, "operator"), (a, "viewer")])
    resp = await gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=creds)
    assert resp.status_code == 201
    await revoke_role(gw.pool, user, a, "operator", actor="test")
    await _refused_within_one_second(
        gw,
        lambda: gw.http.post("/v1/runs", json={"agent_id": "x"}, headers=creds),
        403,
        "the revoked role refused",
    )
    # The token stays good for what the user still holds.
    assert (await gw.http.get("/v1/runs", headers=creds)).status_code != 403


# --- actors and the record ------------------------------------------------------------------------


async def test_a_persons_actions_name_them_as_the_actor(world: World) -> None:
    gw, a = world.gw, world.tenant
    user = f"actor-{a}"
    creds = await _user(gw, user, [(a, "operator")])
    resp = await gw.http.post("/v1/runs", json={"agent_id": "helper-agent"}, headers=creds)
    assert resp.status_code == 201
    [started] = await gw.store.read_stream(stream_id_for(a, "run", resp.json()["run_id"]))
    assert started.actor == f"user:{user}"
    # An agent's run keeps the agent as its actor.
    resp = await gw.http.post(
        "/v1/runs", json={"agent_id": "helper-agent"}, headers=world.creds["key:ingest"]
    )
    [started] = await gw.store.read_stream(stream_id_for(a, "run", resp.json()["run_id"]))
    assert started.actor == "agent:helper-agent"


async def test_people_and_keys_changes_are_on_the_record(world: World) -> None:
    gw, a = world.gw, world.tenant
    user = f"audited-{a}"
    await create_user(gw.pool, user, PASSWORD, actor="mctl")
    await grant_role(gw.pool, user, a, "approver", actor="mctl")
    assert not await grant_role(gw.pool, user, a, "approver", actor="mctl")  # held: no event
    await revoke_role(gw.pool, user, a, "approver", actor="mctl")
    await disable_user(gw.pool, user, actor="mctl")
    own = await gw.store.read_stream(stream_id_for(SYSTEM_TENANT, "user", user))
    assert [(e.event_type, e.payload) for e in own] == [
        ("user.created", {"user_id": user}),
        ("user.disabled", {"user_id": user}),
    ]
    in_tenant = await gw.store.read_stream(stream_id_for(a, "user", user))
    assert [(e.event_type, e.payload["role"], e.actor) for e in in_tenant] == [
        ("user.role_granted", "approver", "mctl"),
        ("user.role_revoked", "approver", "mctl"),
    ]
    assert all(PASSWORD not in json.dumps(e.payload) for e in own)

    token = await issue_key(gw.pool, a, "audited key", ["read", "admit"], actor="mctl")
    key_id = token.split("_")[1]
    await revoke_key(gw.pool, key_id, actor="mctl")
    await revoke_key(gw.pool, key_id, actor="mctl")  # again: no second record
    events = await gw.store.read_stream(stream_id_for(a, "api_key", key_id))
    assert [(e.event_type, e.payload) for e in events] == [
        ("api_key.issued", {"key_id": key_id, "name": "audited key", "scopes": ["admit", "read"]}),
        ("api_key.revoked", {"key_id": key_id}),
    ]
    assert token.split("_", 2)[2] not in json.dumps([e.payload for e in events])


async def test_keys_from_before_scopes_hold_all_three(
    world: World, pool: AsyncConnectionPool
) -> None:
    # A row as the gateway wrote it before migration 0003: no scopes given.
    token = await issue_key(world.gw.pool, world.tenant, "template", actor="test")
    key_id = token.split("_")[1]
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT secret_hash FROM gateway.api_keys WHERE key_id = %s", (key_id,)
            )
        ).fetchone()
        old_id = f"old{key_id[3:]}"
        await conn.execute(
            "INSERT INTO gateway.api_keys (key_id, tenant_id, secret_hash) VALUES (%s, %s, %s)",
            (old_id, world.tenant, row["secret_hash"]),  # type: ignore[index]
        )
    old_token = token.replace(key_id, old_id, 1)
    principal = await KeyVerifier(pool).verify(old_token)
    assert principal.scopes == frozenset(SCOPES)


# --- the tenant's keys and members ----------------------------------------------------------------


async def test_an_admin_issues_lists_and_revokes_only_the_tenants_own_keys(world: World) -> None:
    gw, a, b = world.gw, world.tenant, world.other
    admin = world.creds["admin"]
    resp = await gw.http.post(
        "/v1/api-keys", json={"name": "console test", "scopes": ["read"]}, headers=admin
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    issued = resp.json()
    key_id, token = issued["key_id"], issued["api_key"]
    assert token.startswith(f"mc_{key_id}_") and issued["scopes"] == ["read"]
    new_key = _bearer(token)
    assert (await gw.http.get("/v1/runs", headers=new_key)).status_code != 401

    listing = await gw.http.get("/v1/api-keys", headers=world.creds["key:read"])
    assert listing.status_code == 200, listing.text
    keys = {k["key_id"]: k for k in listing.json()["keys"]}
    assert keys[key_id]["name"] == "console test" and keys[key_id]["revoked_at"] is None
    assert keys[key_id]["scopes"] == ["read"] and keys[key_id]["created_at"].endswith("Z")
    # The secret is in the one answer that issued it, nowhere else.
    assert token.split("_", 2)[2] not in listing.text

    # Another tenant's key: not listed, not revocable (not found), still valid.
    other_key = await issue_key(gw.pool, b, "b's key", actor="test")
    other_id = other_key.split("_")[1]
    assert other_id not in listing.text
    resp = await gw.http.post(f"/v1/api-keys/{other_id}:revoke", headers=admin)
    assert resp.status_code == 404, resp.text
    assert (await gw.http.get("/v1/runs", headers=_bearer(other_key))).status_code != 401

    resp = await gw.http.post(f"/v1/api-keys/{key_id}:revoke", headers=admin)
    assert resp.json() == {"key_id": key_id, "revoked": True}
    assert (await gw.http.post(f"/v1/api-keys/{key_id}:revoke", headers=admin)).status_code == 200

    async def refused() -> bool:
        return (await gw.http.get("/v1/runs", headers=new_key)).status_code == 401

    await wait_until(refused, timeout=5, what="the revoked key refused")
    listing = await gw.http.get("/v1/api-keys", headers=admin)
    (revoked,) = [k for k in listing.json()["keys"] if k["key_id"] == key_id]
    assert revoked["revoked_at"] is not None

    # Bad input is named, never a 500.
    for body in ({"scopes": ["root"]}, {"name": "x" * 101}, {"secret": "mine"}):
        resp = await gw.http.post("/v1/api-keys", json=body, headers=admin)
        assert resp.status_code == 422, resp.text
    resp = await gw.http.post("/v1/api-keys/NOT-AN-ID:revoke", headers=admin)
    assert resp.status_code == 422, resp.text
    # Events name the admin who issued and revoked the key.
    events = await gw.store.read_stream(stream_id_for(a, "api_key", key_id))
    assert [e.event_type for e in events] == ["api_key.issued", "api_key.revoked"]
    assert {e.actor for e in events} == {f"user:admin-{a.removeprefix('rbac-a')}"}
    assert token.split("_", 2)[2] not in str([e.payload for e in events])


async def test_members_are_the_users_holding_a_role_in_the_callers_tenant(world: World) -> None:
    gw, a, b = world.gw, world.tenant, world.other
    suffix = a.removeprefix("rbac-a")
    both = f"both-{suffix}"
    await _user(gw, both, [(a, "viewer"), (a, "approver"), (b, "admin")])
    only_b = f"only-b-{suffix}"
    await _user(gw, only_b, [(b, "viewer")])
    resp = await gw.http.get("/v1/members", headers=world.creds["viewer"])
    assert resp.status_code == 200, resp.text
    members = {m["user_id"]: m for m in resp.json()["members"]}
    assert only_b not in members
    assert members[both] == {"user_id": both, "roles": ["approver", "viewer"], "disabled": False}
    for role in ROLES:
        assert members[f"{role}-{suffix}"]["roles"] == [role]
    assert "password" not in resp.text and "argon2" not in resp.text
    await disable_user(gw.pool, both, actor="test")
    resp = await gw.http.get("/v1/members", headers=world.creds["key:read"])
    assert {m["user_id"]: m for m in resp.json()["members"]}[both]["disabled"] is True
