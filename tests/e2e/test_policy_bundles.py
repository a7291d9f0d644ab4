"""A tenant's own signed bundle, end to end: a key registered by an admin, a bundle signed and
pushed with ``mctl policy``, activated by digest, decisions switching to it, and a tampered bundle
refused while decisions continue with the active one."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs import policy_bundles as artifacts
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR
from tests.e2e.conftest import RunningSystem, mctl, wait_for
from tests.integration.helpers.policy_bundles import new_key, repo_files, signed

pytestmark = pytest.mark.e2e

PASSWORD = "a passphrase long enough"


def _admin_token(system: RunningSystem, tenant: str, uid: str) -> str:
    user = f"policy-admin-{uid}"
    db = ("--database-url", system.admin_url)
    made = subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", "user", "create", user, "--password-stdin", *db],
        capture_output=True,
        text=True,
        timeout=120,
        input=f"{PASSWORD}\n",
    )
    assert made.returncode == 0, made.stderr
    mctl("user", "grant", user, tenant, "admin", *db)
    with httpx.Client(base_url=system.gateway_url, timeout=30) as http:
        resp = http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["access_token"])


def _tenant(system: RunningSystem, prefix: str) -> tuple[str, str, str]:
    """A new tenant: its name, an API key and an admin person's token."""
    uid = uuid.uuid4().hex[:10]
    tenant = f"{prefix}{uid}"
    return tenant, system.key_for(tenant), _admin_token(system, tenant, uid)


def signing_key_file(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A new signing key and the file ``mctl policy sign --key`` reads it from."""
    key = new_key()
    key_file = tmp_path / "release.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, key_file


def _client(base: str, bearer: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {bearer}"})


def _decide(http: httpx.Client, run_id: str, step: int) -> str:
    resp = http.post(
        f"/v1/runs/{run_id}/admissions",
        json={"step_index": step, "model": "gpt-4o", "estimate": {"input_tokens": 10}},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == "allow"
    return str(resp.json()["bundle_digest"])


def _tampered(archive: bytes) -> bytes:
    """The archive with one policy file changed after signing."""
    files = artifacts.extract(archive)
    files["policies/token_limit.rego"] += b"\n# changed after signing\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_pushed_bundle_decides_once_activated_and_a_bad_one_is_refused(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    _, api_key, token = _tenant(whole_system, "bundles")
    key, key_file = signing_key_file(tmp_path)
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as agent:
        # Only an admin person registers signing keys; an API key may not.
        pem = {"public_key": artifacts.public_pem(key)}
        assert agent.put("/v1/policy-signing-keys/release", json=pem).status_code == 403
        resp = admin.put("/v1/policy-signing-keys/release", json=pem)
        assert resp.status_code == 200, resp.text

        run_id = agent.post("/v1/runs", json={"agent_id": "bundled"}).json()["run_id"]
        default_digest = _decide(agent, run_id, 1)

        bundle = tmp_path / "bundle.tar.gz"
        out = mctl(
            "policy",
            "sign",
            str(DEFAULT_BUNDLE_DIR),
            "--key",
            str(key_file),
            "--key-id",
            "release",
            "--revision",
            "7",
            "--output",
            str(bundle),
        )
        digest = artifacts.archive_digest(bundle.read_bytes())
        assert digest in out
        env = {**os.environ, "MC_GATEWAY_URL": base, "MC_API_KEY": api_key}
        pushed = mctl(
            "policy",
            "push",
            str(bundle),
            "--environment",
            "production",
            "--activate",
            "--immediate",
            env=env,
        )
        assert digest in pushed and '"activated": true' in pushed

        assert digest != default_digest
        assert _decide(agent, run_id, 2) == digest
        listing = agent.get("/v1/policies").json()
        assert listing["environments"]["production"] == {
            "bundle_digest": digest,
            "source": "tenant",
            "revision": "7",
        }
        assert listing["environments"]["sandbox"]["source"] == "default"

        # A tampered bundle and an unpinned reload are refused by name; decisions continue.
        resp = agent.post(
            "/v1/policy-bundles",
            params={"environment": "production"},
            content=_tampered(bundle.read_bytes()),
            headers={"Content-Type": "application/gzip"},
        )
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["message"].startswith("bundle_file_tampered: ")
        resp = agent.post("/v1/policy-bundles:activate", params={"environment": "production"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["message"].startswith("bundle_reload_unpinned: ")
        assert _decide(agent, run_id, 3) == digest

        # Settings apply at once, versioned.
        resp = agent.put("/v1/policy-settings", json={"model_allowlist": ["claude-sonnet-4"]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == 1
        resp = agent.put(
            "/v1/policy-settings", json={"max_tokens_per_run": 5}, headers={"If-Match": '"0"'}
        )
        assert resp.status_code == 409, resp.text
        denied = agent.post(
            f"/v1/runs/{run_id}/admissions",
            json={"step_index": 4, "model": "gpt-4o", "estimate": {"input_tokens": 10}},
        ).json()
        assert denied["outcome"] == "deny" and denied["bundle_digest"] == digest
        assert denied["reasons"][0]["policy_id"] == "model_allowlist"
        assert agent.get("/v1/policies").json()["settings"]["version"] == 1


def _admit_gpt(agent: httpx.Client, agent_id: str) -> dict[str, Any]:
    run_id = agent.post("/v1/runs", json={"agent_id": agent_id}).json()["run_id"]
    resp = agent.post(
        f"/v1/runs/{run_id}/admissions",
        json={"step_index": 1, "model": "gpt-4o", "estimate": {"input_tokens": 10}},
    )
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def test_a_policy_exception_granted_by_an_admin_waives_a_deny_until_revoked(
    whole_system: RunningSystem,
) -> None:
    _, api_key, token = _tenant(whole_system, "waivers")
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as agent:
        resp = agent.put("/v1/policy-settings", json={"model_allowlist": ["claude-sonnet-4"]})
        assert resp.status_code == 200, resp.text
        assert _admit_gpt(agent, "waived")["outcome"] == "deny"

        expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
        body = {
            "policy_id": "model_allowlist",
            "agent_id": "waived",
            "reason": "evaluating the model",
            "expires_at": expires.isoformat(),
        }
        # People only: an API key may not grant one, whatever its scopes.
        assert agent.post("/v1/policy-exceptions", json=body).status_code == 403
        for expiry, problem in (
            (datetime.now(UTC) - timedelta(minutes=1), "exception_expiry_past"),
            (datetime.now(UTC) + timedelta(days=91), "exception_expiry_too_far"),
        ):
            resp = admin.post(
                "/v1/policy-exceptions", json={**body, "expires_at": expiry.isoformat()}
            )
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"]["message"].startswith(f"{problem}: ")
        body = {**body, "exception_id": f"ex-{uuid.uuid4().hex[:8]}"}
        resp = admin.post("/v1/policy-exceptions", json=body)
        assert resp.status_code == 201, resp.text
        granted = resp.json()
        assert granted["granted_by"].startswith("user:policy-admin-")
        exception_id = granted["exception_id"]
        assert exception_id == body["exception_id"]
        # A retried grant answers the same exception; the same id with other terms is a 409.
        again = admin.post("/v1/policy-exceptions", json=body)
        assert again.status_code == 201 and again.json() == granted, again.text
        other = admin.post("/v1/policy-exceptions", json={**body, "reason": "something else"})
        assert other.status_code == 409, other.text
        assert other.json()["error"]["message"].startswith("exception_id_taken: ")

        # Applied at once by the replica that recorded it; any other follows within a poll.
        waived = wait_for(
            lambda: (a := _admit_gpt(agent, "waived"))["outcome"] == "warn" and a,
            what="the waived admission",
        )
        assert waived["exceptions"] == [exception_id]
        assert waived["reasons"][0]["policy_id"] == "model_allowlist"
        assert _admit_gpt(agent, "another-agent")["outcome"] == "deny"
        listing = agent.get("/v1/policy-exceptions", params={"status": "open"}).json()
        assert [e["exception_id"] for e in listing["exceptions"]] == [exception_id]
        assert listing["burndown"] == [{"day": expires.date().isoformat(), "open": 1}]

        resp = admin.post(f"/v1/policy-exceptions/{exception_id}:revoke", json={"reason": "done"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "revoked"
        wait_for(
            lambda: _admit_gpt(agent, "waived")["outcome"] == "deny", what="denied once revoked"
        )
        resp = admin.post("/v1/policy-exceptions/unknown-id:revoke")
        assert resp.status_code == 404, resp.text


def _deny_in(agent: httpx.Client, environment: str) -> str:
    run_id = agent.post("/v1/runs", json={"agent_id": f"frozen-{environment}"}).json()["run_id"]
    resp = agent.post(
        f"/v1/runs/{run_id}/admissions",
        json={
            "step_index": 1,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10},
            "environment": environment,
        },
    )
    assert resp.status_code == 200 and resp.json()["outcome"] == "deny", resp.text
    return str(run_id)


def _freeze(http: httpx.Client) -> dict[str, dict[str, Any]]:
    resp = http.get("/v1/policy-freeze")
    assert resp.status_code == 200, resp.text
    return {e["environment"]: e for e in resp.json()["environments"]}


def test_an_open_incident_freezes_promotions_in_its_environment_until_resolved_or_overridden(
    whole_system: RunningSystem,
) -> None:
    _, api_key, token = _tenant(whole_system, "freeze")
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as agent:
        resp = agent.put(
            "/v1/policy-settings",
            json={"model_allowlist": ["claude-sonnet-4"], "freeze_min_severity": "medium"},
        )
        assert resp.status_code == 200, resp.text
        assert not any(e["frozen"] for e in _freeze(agent).values())

        # A denied sandbox step (model_allowlist: medium) opens an incident there: the sandbox
        # freezes, production does not.
        _deny_in(agent, "sandbox")
        frozen = wait_for(
            lambda: (f := _freeze(agent))["sandbox"]["frozen"] and f, what="the sandbox freeze"
        )
        assert frozen["production"]["frozen"] is False
        assert frozen["sandbox"]["threshold"] == "medium"
        (sandbox_incident,) = frozen["sandbox"]["incidents"]
        assert sandbox_incident["severity"] == "medium"

        _deny_in(agent, "production")
        wait_for(lambda: _freeze(agent)["production"]["frozen"], what="the production freeze")

        # Only an admin person overrides, with a reason; who and why are kept.
        body = {"reason": "hotfix for the incident itself"}
        assert agent.post("/v1/policy-freeze/production:override", json=body).status_code == 403
        assert admin.post("/v1/policy-freeze/production:override", json={}).status_code == 422
        resp = admin.post("/v1/policy-freeze/production:override", json=body)
        assert resp.status_code == 200, resp.text
        overridden = resp.json()
        assert overridden["frozen"] is False
        assert overridden["overrides"][0]["by"].startswith("user:policy-admin-")
        assert overridden["overrides"][0]["reason"] == body["reason"]
        again = admin.post("/v1/policy-freeze/production:override", json=body)
        assert again.status_code == 409, again.text
        assert again.json()["error"]["message"].startswith("freeze_not_active: ")
        assert admin.post("/v1/policy-freeze/staging:override", json=body).status_code == 422

        # Resolving the incident lifts the sandbox freeze.
        resp = agent.post(
            f"/v1/incidents/{sandbox_incident['incident_id']}/resolve",
            json={"resolution": "allowlist fixed", "by": "oncall"},
        )
        assert resp.status_code == 200, resp.text
        wait_for(lambda: not _freeze(agent)["sandbox"]["frozen"], what="the sandbox thaw")


def _drift(http: httpx.Client, action: str = "", body: dict[str, Any] | None = None) -> Any:
    resp = (
        http.post(f"/v1/policy-drift:{action}", json=body)
        if action
        else http.get("/v1/policy-drift")
    )
    return resp


def test_drift_between_sandbox_and_production_is_recorded_blocks_and_is_aligned_or_acknowledged(
    whole_system: RunningSystem,
) -> None:
    tenant, api_key, token = _tenant(whole_system, "drift")
    key = new_key()
    files = repo_files()
    data = json.loads(files["data.json"])
    # This tenant's entry only: the bundle's own tests (other tenants) still pass.
    data["missioncontrol"]["config"]["tenants"][tenant] = {"model_allowlist": ["claude-sonnet-4"]}
    files["data.json"] = json.dumps(data).encode()
    archive = signed(key, files, key_id="release")
    base = whole_system.gateway_url
    with _client(base, token) as admin, _client(base, api_key) as agent:
        resp = admin.put(
            "/v1/policy-signing-keys/release", json={"public_key": artifacts.public_pem(key)}
        )
        assert resp.status_code == 200, resp.text
        same = _drift(agent).json()
        assert same["drifted"] is False and same["blocking"] == [] and same["recorded"] is None

        # Only the sandbox gets a bundle of its own (with a model allowlist in its data).
        resp = agent.post(
            "/v1/policy-bundles",
            params={"environment": "sandbox"},
            content=archive,
            headers={"Content-Type": "application/gzip"},
        )
        assert resp.status_code == 201, resp.text
        digest = resp.json()["bundle_digest"]
        resp = agent.post(
            "/v1/policy-bundles:activate",
            params={"environment": "sandbox", "digest": digest},
            json={"immediate": True},
        )
        assert resp.status_code == 200, resp.text

        live = _drift(agent).json()
        assert live["drifted"] is True
        assert live["dimensions"] == ["policy_bundle_digest", "policy_set_hash", "allowlist_hash"]
        assert live["snapshots"]["sandbox"]["policy_bundle_digest"] == digest
        assert _drift(agent, "check").status_code == 403  # an API key does not govern
        checked = _drift(admin, "check").json()
        recorded = checked["recorded"]
        assert recorded["dimensions"] == live["dimensions"] and recorded["acknowledged_by"] is None
        assert checked["blocking"][0].startswith("policy_drift: sandbox and production differ in")

        # Acknowledging drift one has not seen is refused; the drift seen is accepted, audited.
        stale = {"reason": "reviewed", "fingerprint": "sha256:" + "0" * 64}
        resp = _drift(admin, "acknowledge", stale)
        assert resp.status_code == 409 and "drift_changed: " in resp.text, resp.text
        resp = _drift(
            admin,
            "acknowledge",
            {"reason": "sandbox trial", "fingerprint": recorded["fingerprint"]},
        )
        assert resp.status_code == 200, resp.text
        accepted = resp.json()
        assert accepted["blocking"] == []
        assert accepted["recorded"]["acknowledged_by"].startswith("user:policy-admin-")
        assert accepted["recorded"]["acknowledged_reason"] == "sandbox trial"

        # Production decides with the repository's bundle: nothing to copy from it.
        resp = _drift(admin, "align", {"source": "production"})
        assert resp.status_code == 409 and "drift_align_default: " in resp.text, resp.text
        # Aligning production with the sandbox ends the drift; it decides with that bundle.
        resp = _drift(admin, "align", {"source": "sandbox"})
        assert resp.status_code == 200, resp.text
        aligned = resp.json()
        assert aligned["drifted"] is False and aligned["recorded"] is None
        assert agent.get("/v1/policies").json()["environments"]["production"]["bundle_digest"] == (
            digest
        )
        resp = _drift(admin, "acknowledge", {"reason": "nothing left"})
        assert resp.status_code == 409 and "drift_not_found: " in resp.text, resp.text
