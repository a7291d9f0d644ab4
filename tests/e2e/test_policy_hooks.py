"""Policy hooks end to end through the gateway and the real policy-admission: a lifecycle
hook's decision with violations, locked fields, mutations and runbook links, recorded as
``policy.hook_evaluated``; an unknown hook or a bad body refused by name; and after_execute
judging a recorded step, waived by a policy exception until it expires."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import RunningSystem, event_counts, wait_for
from tests.e2e.test_policy_bundles import _admin_token, _client

pytestmark = pytest.mark.e2e


def _evaluate(http: httpx.Client, hook: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"/v1/policy-hooks/{hook}/evaluate", json=body)


def test_a_create_attempt_is_decided_recorded_and_bad_requests_are_named(
    whole_system: RunningSystem,
) -> None:
    tenant = f"hooks{uuid.uuid4().hex[:10]}"
    with _client(whole_system.gateway_url, whole_system.key_for(tenant)) as agent:
        agent_spec = {"id": "support-bot", "model": {"name": "gpt-4"}, "tools": ["search"]}
        resp = _evaluate(agent, "on_create_attempt", {"agent": agent_spec})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["hook"] == "on_create_attempt" and body["outcome"] == "deny"
        assert [v["policy_id"] for v in body["violations"]] == ["agent_owner"]
        assert [w["policy_id"] for w in body["warnings"]] == ["max_steps", "model_deprecation"]
        assert {"path": "model.name", "value": "gpt-4o"}.items() <= next(
            m for m in body["mutations"] if m["policy_id"] == "model_deprecation"
        ).items()
        assert {lock["field"] for lock in body["locked_fields"]} >= {"identity.owner"}
        assert any(url.endswith("runbooks/agent_owner.md") for url in body["runbooks"])
        assert body["bundle_digest"].startswith("sha256:")
        wait_for(
            lambda: event_counts(whole_system.admin_url, tenant).get("policy.hook_evaluated") == 1,
            20,
            "the decision recorded",
        )

        unknown = _evaluate(agent, "on_lunch", {})
        assert unknown.status_code == 422, unknown.text
        assert "hook" in unknown.text and "on_create_attempt" in unknown.text
        bad = _evaluate(agent, "on_create_attempt", {"agent": "not an object"})
        assert bad.status_code == 422 and "agent" in bad.text
        nul = _evaluate(agent, "on_create_attempt", {"agent": {"id": "a\u0000b"}})
        assert nul.status_code == 422 and "NUL" in nul.text
        scan = _evaluate(agent, "on_policy_update", {"request": {"subjects": []}})
        assert scan.status_code == 422 and "request.subjects" in scan.text
        # None of the refusals recorded anything.
        assert event_counts(whole_system.admin_url, tenant).get("policy.hook_evaluated") == 1


def test_after_execute_judges_the_recorded_step_and_honours_an_exception_until_expiry(
    whole_system: RunningSystem,
) -> None:
    uid = uuid.uuid4().hex[:10]
    tenant = f"hooksx{uid}"
    base = whole_system.gateway_url
    api_key = whole_system.key_for(tenant)  # creates the tenant
    token = _admin_token(whole_system, tenant, uid)
    with _client(base, api_key) as agent, _client(base, token) as admin:
        run_id = agent.post("/v1/runs", json={"agent_id": "big-reader"}).json()["run_id"]
        admitted = agent.post(
            f"/v1/runs/{run_id}/admissions",
            json={"step_index": 1, "model": "gpt-4o", "estimate": {"input_tokens": 10}},
        )
        assert admitted.json()["outcome"] == "allow", admitted.text
        # The step read far more than it announced.
        recorded = agent.post(
            f"/v1/runs/{run_id}/steps",
            json={"step_index": 1, "model": "gpt-4o", "input_tokens": 20000, "output_tokens": 5},
        )
        assert recorded.status_code == 201, recorded.text
        after = {"request": {"run_id": run_id, "step_index": 1}}

        judged = _evaluate(agent, "after_execute", after).json()
        assert judged["outcome"] == "deny", judged
        assert [v["policy_id"] for v in judged["violations"]] == ["run_budget_actual"]
        assert "20005 tokens" in judged["violations"][0]["message"]
        missing = _evaluate(
            agent, "after_execute", {"request": {"run_id": run_id, "step_index": 2}}
        )
        assert missing.status_code == 404 and "step 2" in missing.text

        expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
        granted = admin.post(
            "/v1/policy-exceptions",
            json={
                "policy_id": "run_budget_actual",
                "run_id": run_id,
                "reason": "a one-off bulk import",
                "expires_at": expires_at.isoformat(),
            },
        )
        assert granted.status_code == 201, granted.text
        exception_id = granted.json()["exception_id"]

        def outcome() -> dict[str, Any]:
            return dict(_evaluate(agent, "after_execute", after).json())

        waived = wait_for(lambda: (d := outcome())["outcome"] == "warn" and d, 20, "waived")
        assert waived["exceptions"] == [exception_id]
        assert [v["policy_id"] for v in waived["violations"]] == ["run_budget_actual"]
        assert datetime.now(UTC) < expires_at + timedelta(seconds=1)

        # From the second it expires, the exception never applies again.
        wait_for(lambda: outcome()["outcome"] == "deny", 20, "the exception expired")
        assert datetime.now(UTC) >= expires_at
        assert outcome()["exceptions"] == []
