"""The console's API on the whole system: the tenant-wide event stream (``GET /v1/live``) sees a
run's events as they happen, resumes exactly after ``Last-Event-ID`` and never carries another
tenant's; analytics and monthly statements answer from the projections what the runs recorded.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from services.gateway.client import MissionControlClient
from services.gateway.keys import run_with_pool
from services.gateway.users import create_user, grant_role
from tests.e2e.conftest import RunningSystem, wait_for
from tests.e2e.test_live_tokens import SseReader

MODEL = "gpt-4o-mini"


def _tenant(sys_: RunningSystem, name: str) -> tuple[str, MissionControlClient, httpx.Client]:
    tenant = f"{name}-{uuid.uuid4().hex[:8]}"
    key = sys_.key_for(tenant)
    client = MissionControlClient(sys_.gateway_url, key, timeout=30)
    http = httpx.Client(
        base_url=sys_.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    return tenant, client, http


def _step(client: MissionControlClient, run_id: str, index: int) -> None:
    verdict = client.admit(run_id, index, model=MODEL, input_tokens=1000, max_output_tokens=500)
    assert verdict.outcome == "allow", verdict
    client.record_step(
        run_id, index, kind="llm_call", model=MODEL, input_tokens=1000, output_tokens=200
    )


def _events_of(reader: SseReader) -> list[dict[str, Any]]:
    return [m for m in reader.messages if m["event"] != "snapshot"]


def test_the_live_stream_follows_the_tenant_resumes_exactly_and_keeps_tenants_apart(
    whole_system: RunningSystem,
) -> None:
    tenant, mine, http = _tenant(whole_system, "live")
    _, theirs, their_http = _tenant(whole_system, "other")
    their_http.close()
    with mine, theirs, http:
        running = mine.start_run("watched").run_id
        wait_for(
            lambda: any(r["run_id"] == running for r in mine.runs(status="live")["runs"]),
            60,
            "the running run projected",
        )
        first = SseReader(http, "/v1/live?heartbeat_s=1")
        wait_for(lambda: first.messages, 60, "the snapshot")
        assert first.status == 200
        snapshot = first.messages[0]
        assert snapshot["event"] == "snapshot"
        assert [r["run_id"] for r in snapshot["data"]["runs"]] == [running]
        assert snapshot["data"]["runs"][0]["status"] == "running"

        # Another tenant's run with the same agent: never on this stream.
        other_run = theirs.start_run("watched").run_id
        _step(theirs, other_run, 1)
        run = mine.start_run("watched").run_id
        _step(mine, run, 1)
        wait_for(
            lambda: [m["event"] for m in first.messages if m.get("data", {}).get("payload", {})
                     .get("run_id") == run][:1] == ["run.started"],
            60,
            "run.started on the stream",
        )  # fmt: skip
        wait_for(lambda: first.of("run.step_recorded"), 60, "the step on the stream")
        started = next(m for m in first.messages if m["event"] == "run.started")
        resume_at = started["id"]
        first.close()

        # Away: the run goes on and ends without a viewer.
        _step(mine, run, 2)
        mine.finish_run(run, "completed")
        second = SseReader(http, "/v1/live?heartbeat_s=1", last_event_id=resume_at)
        wait_for(lambda: second.of("run.completed"), 60, "run.completed after the resume")
        wait_for(lambda: second.heartbeats >= 1, 30, "a heartbeat")
        second.close()
        assert second.status == 200 and not second.of("snapshot")  # a resume carries on

        seen_first = _events_of(first)
        seen_second = _events_of(second)
        after = seen_first[seen_first.index(started) + 1 :]
        # Exactly after: what the first connection saw past the resume point comes again, in
        # the same order, first; the resume point itself does not.
        assert seen_second[: len(after)] == after
        assert started["data"]["event_id"] not in {m["data"]["event_id"] for m in seen_second}
        ids = [tuple(map(int, m["id"].split("-"))) for m in seen_second]
        assert all(a < b for a, b in itertools.pairwise(ids)), ids
        assert ids[0] > tuple(map(int, resume_at.split("-")))
        kinds = [m["event"] for m in seen_second]
        assert kinds.count("run.step_recorded") >= 1 and kinds.count("run.completed") == 1
        # Every message is this tenant's: no other tenant's event, run or id.
        for m in [*seen_first, *seen_second]:
            assert m["data"]["tenant_id"] == tenant, m
            assert other_run not in str(m["data"])

        refused = http.get("/v1/live", headers={"Last-Event-ID": "not-a-cursor"})
        assert refused.status_code == 422 and "Last-Event-ID" in refused.text


def test_analytics_and_statements_answer_what_the_runs_recorded(
    whole_system: RunningSystem,
) -> None:
    _, client, http = _tenant(whole_system, "insight")
    with client, http:
        run = client.start_run("analyst").run_id
        _step(client, run, 1)
        client.finish_run(run, "completed")
        today = datetime.now(UTC).date().isoformat()
        period = today[:7]

        def table(view: str) -> list[dict[str, Any]]:
            resp = http.get(f"/v1/analytics/{view}", params={"days": 7})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["view"] == view and body["days"] == 7
            return [dict(zip(body["columns"], r, strict=True)) for r in body["rows"]]

        by_model = wait_for(lambda: table("cost_by_model_day"), 60, "the cost projected")
        assert by_model == [
            {"day": today, "model": MODEL, "cost_usd": by_model[0]["cost_usd"], "tokens": 1200}
        ]
        assert float(by_model[0]["cost_usd"]) > 0
        assert [(r["agent_id"], r["tokens"]) for r in table("cost_by_agent_day")] == [
            ("analyst", 1200)
        ]
        assert table("decisions_by_day") == [{"day": today, "outcome": "allow", "decisions": 1}]
        assert table("denials_by_policy") == [] and table("incidents_by_day") == []
        done = wait_for(
            lambda: [r for r in table("productivity") if r["completed"] == 1], 60, "the run's end"
        )
        assert done[0]["agent_id"] == "analyst" and done[0]["runs"] == 1
        assert done[0]["mean_duration_s"] >= 0 and done[0]["tokens"] == 1200

        unknown = http.get("/v1/analytics/cost_by_moon")
        assert unknown.status_code == 422 and "cost_by_model_day" in unknown.text
        for days in (0, 367):
            resp = http.get("/v1/analytics/productivity", params={"days": days})
            assert resp.status_code == 422 and "days" in resp.text

        listing = http.get("/v1/statements").json()["statements"]
        assert listing == [
            {"period": period, "runs": 1, "tokens": 1200, "cost_usd": by_model[0]["cost_usd"],
             "unpriced_calls": 0}
        ]  # fmt: skip
        statement = http.get(f"/v1/statements/{period}").json()
        assert statement["total_usd"] == by_model[0]["cost_usd"]
        assert [
            (x["agent_id"], x["model"], x["runs"], x["tokens"]) for x in statement["lines"]
        ] == [("analyst", MODEL, 1, 1200)]
        for bad in ("2026-13", "2026-1", "latest"):
            resp = http.get(f"/v1/statements/{bad}")
            assert resp.status_code == 422 and "period" in resp.text, resp.text


def test_an_admin_issues_a_key_whose_secret_is_shown_once_and_never_logged(
    whole_system: RunningSystem,
) -> None:
    tenant, client, http = _tenant(whole_system, "keys")
    user, password = f"admin-{tenant}", f"pw-{uuid.uuid4().hex}"

    async def admin(pool: Any) -> None:
        await create_user(pool, user, password, actor="test")
        await grant_role(pool, user, tenant, "admin", actor="test")

    run_with_pool(whole_system.admin_url, admin)
    with client, http:
        signed_in = http.post("/v1/auth/token", json={"username": user, "password": password})
        assert signed_in.status_code == 200, signed_in.text
        person = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
        # A key (the console's, signed in with one) may list keys but never issue one.
        refused = http.post("/v1/api-keys", json={"name": "from a key"})
        assert refused.status_code == 403 and "API keys may not" in refused.text

        issued = http.post(
            "/v1/api-keys", json={"name": "console", "scopes": ["read"]}, headers=person
        )
        assert issued.status_code == 201, issued.text
        token = issued.json()["api_key"]
        secret = token.split("_", 2)[2]
        key_id = issued.json()["key_id"]
        mine = httpx.get(
            f"{whole_system.gateway_url}/v1/api-keys",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert mine.status_code == 200 and secret not in mine.text
        assert key_id in {k["key_id"] for k in mine.json()["keys"]}
        members = http.get("/v1/members").json()["members"]
        assert members == [{"user_id": user, "roles": ["admin"], "disabled": False}]
        revoked = http.post(f"/v1/api-keys/{key_id}:revoke", headers=person)
        assert revoked.status_code == 200, revoked.text

    for path in sorted((whole_system.data_dir / "logs").glob("*")):
        assert secret not in path.read_text(errors="replace"), path
