"""Counterfactual simulation end to end: decisions recorded through the running system, a
stricter bundle uploaded (not activated), simulated on them through the API and ``mctl policy
simulate``; the flips, the stopped step, the prevented cost (against the recorded step costs)
and a policy exception applied as of each decision's time."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs import policy_bundles as artifacts
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR
from tests.e2e.conftest import RunningSystem, mctl, wait_for
from tests.e2e.test_policy_bundles import _admin_token, _client, signing_key_file

pytestmark = pytest.mark.e2e

LIMIT = 3000
"""The candidate's token limit for the tenant; every step asks for 2,000 tokens."""


def _run(agent: httpx.Client, agent_id: str, steps: int) -> str:
    """A run of ``steps`` steps, each admitted (by the active bundle) then recorded."""
    run_id = str(agent.post("/v1/runs", json={"agent_id": agent_id}).json()["run_id"])
    for step in range(1, steps + 1):
        resp = agent.post(
            f"/v1/runs/{run_id}/admissions",
            json={
                "step_index": step,
                "model": "gpt-4o",
                "estimate": {"input_tokens": 1000, "max_output_tokens": 1000},
            },
        )
        assert resp.status_code == 200 and resp.json()["outcome"] == "allow", resp.text
        resp = agent.post(
            f"/v1/runs/{run_id}/steps",
            json={
                "step_index": step,
                "model": "gpt-4o",
                "input_tokens": 1000,
                "output_tokens": 1000,
            },
        )
        assert resp.status_code in (200, 201, 202), resp.text
    return run_id


def _step_costs(agent: httpx.Client, run_id: str, steps: int) -> dict[int, Decimal] | None:
    """The recorded cost of each step of the run, once every step and decision is projected."""
    trace = agent.get(f"/v1/runs/{run_id}/trace").json()
    costed = {
        s["step_index"]: Decimal(s["cost"]["total_cost_usd"])
        for s in trace.get("steps", [])
        if s.get("cost") and s["cost"].get("total_cost_usd") is not None
    }
    decided = [s for s in trace.get("steps", []) if s.get("decision")]
    return costed if len(costed) == steps and len(decided) == steps else None


def _candidate(tmp_path: Path, tenant: str, key_file: Path) -> Path:
    """The repository bundle with a token limit of :data:`LIMIT` for ``tenant``, signed."""
    source = tmp_path / "candidate"
    shutil.copytree(DEFAULT_BUNDLE_DIR, source)
    data = json.loads((source / "data.json").read_text())
    data["missioncontrol"]["config"]["tenants"][tenant] = {"max_tokens_per_run": LIMIT}
    (source / "data.json").write_text(json.dumps(data, indent=2))
    bundle = tmp_path / "candidate.tar.gz"
    mctl(
        "policy",
        "sign",
        str(source),
        "--key",
        str(key_file),
        "--key-id",
        "release",
        "--revision",
        "3",
        "--output",
        str(bundle),
    )
    return bundle


def _done(http: httpx.Client, simulation_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        view: dict[str, Any] = http.get(f"/v1/policy-simulations/{simulation_id}").json()
        assert view["status"] != "failed", view
        return view if view["status"] == "done" else None

    result: dict[str, Any] = wait_for(finished, timeout=180, what="the simulation's report")
    return result


def test_a_stricter_bundle_simulated_on_recorded_decisions(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:10]
    tenant = f"simulate{uid}"
    api_key = whole_system.key_for(tenant)
    token = _admin_token(whole_system, tenant, uid)
    key, key_file = signing_key_file(tmp_path)
    base = whole_system.gateway_url
    since = datetime.now(UTC) - timedelta(seconds=1)
    with _client(base, token) as admin, _client(base, api_key) as agent:
        # Agent "waived" holds an exception to token_limit from before its decisions.
        expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        resp = admin.post(
            "/v1/policy-exceptions",
            json={
                "policy_id": "token_limit",
                "agent_id": "waived",
                "reason": "a larger budget this week",
                "expires_at": expires.isoformat(),
            },
        )
        assert resp.status_code == 201, resp.text
        exception_id = resp.json()["exception_id"]

        strict = _run(agent, "strict", 3)
        waived = _run(agent, "waived", 2)
        costs = wait_for(
            lambda: _step_costs(agent, strict, 3), timeout=60, what="the projected step costs"
        )
        wait_for(lambda: _step_costs(agent, waived, 2), timeout=60, what="the waived run")
        until = datetime.now(UTC) + timedelta(seconds=1)

        pem = {"public_key": artifacts.public_pem(key)}
        assert admin.put("/v1/policy-signing-keys/release", json=pem).status_code == 200
        bundle = _candidate(tmp_path, tenant, key_file)
        resp = agent.post(
            "/v1/policy-bundles",
            params={"environment": "production"},
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/gzip"},
        )
        assert resp.status_code == 201, resp.text
        digest = resp.json()["bundle_digest"]

        # Clear refusals: an unknown digest, an inverted window, a window too long.
        window = {"since": since.isoformat(), "until": until.isoformat()}
        unknown = agent.post(
            "/v1/policy-simulations", json={**window, "bundle_digest": f"sha256:{'1' * 64}"}
        )
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["message"].startswith("bundle_not_found: ")
        for bad, problem in (
            ({"since": window["until"], "until": window["since"]}, "simulation_window_inverted"),
            (
                {"since": (since - timedelta(days=40)).isoformat(), "until": window["until"]},
                "simulation_window_too_long",
            ),
        ):
            resp = agent.post("/v1/policy-simulations", json={**bad, "bundle_digest": digest})
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"]["message"].startswith(f"{problem}: ")

        resp = agent.post("/v1/policy-simulations", json={**window, "bundle_digest": digest})
        assert resp.status_code == 202, resp.text
        assert resp.json()["status"] in ("queued", "running", "done")
        report = _done(agent, resp.json()["simulation_id"])["report"]

        # strict: steps 2 and 3 would have been denied (2,000 used + 2,000 asked > 3,000); the
        # run stops at step 2, preventing the recorded cost of steps 2 and 3. waived: step 2 is
        # denied by the candidate too, but the exception open then makes it a warning.
        assert report["decisions"] == 5
        assert report["flipped"] == 3
        [policy] = report["policies"]
        assert policy["policy_id"] == "token_limit"
        assert policy["flips"]["allow_to_deny"] == 2
        assert policy["flips"]["allow_to_warn"] == 1
        assert report["waived"] == 1
        [stop] = report["stopped_runs"]
        assert (stop["run_id"], stop["step_index"], stop["policy_id"]) == (
            strict,
            2,
            "token_limit",
        )
        prevented = costs[2] + costs[3]
        assert Decimal(stop["prevented_cost_usd"]) == prevented.quantize(Decimal("0.000001"))
        assert Decimal(policy["prevented_cost_usd"]) == Decimal(stop["prevented_cost_usd"])
        warned = [f for f in report["flipped_decisions"] if f["kind"] == "allow_to_warn"]
        assert [(f["run_id"], f["step_index"], f["exceptions"]) for f in warned] == [
            (waived, 2, [exception_id])
        ]

        # The same report as CSV, by query or by Accept; and through the CLI.
        simulation_id = resp.json()["simulation_id"]
        by_query = agent.get(f"/v1/policy-simulations/{simulation_id}", params={"format": "csv"})
        by_accept = agent.get(
            f"/v1/policy-simulations/{simulation_id}", headers={"Accept": "text/csv"}
        )
        assert by_query.status_code == by_accept.status_code == 200
        assert by_query.headers["content-type"].startswith("text/csv")
        assert by_query.text == by_accept.text
        assert by_query.text.splitlines()[1].startswith("token_limit,3,2,0,1,")

        env = {**os.environ, "MC_GATEWAY_URL": base, "MC_API_KEY": api_key}
        args = ("--digest", digest, "--since", window["since"], "--until", window["until"])
        out = mctl("policy", "simulate", *args, "--format", "csv", env=env)
        assert out == by_query.text
        out = mctl("policy", "simulate", *args, "--agent", "strict", env=env)
        only_strict = json.loads(out)
        assert only_strict["decisions"] == 3 and only_strict["runs_stopped"] == 1

    # No side effects: the runs were not stopped and no decision changed.
    with _client(base, api_key) as agent:
        assert agent.get(f"/v1/runs/{strict}").json()["status"] == "running"
