"""The governed run, end to end, through the public HTTP API of a whole running system."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from libs.contracts.subjects import event_subject
from libs.eventbus.jetstream import connect
from libs.runtime.busauth import RELAY_USER
from services.gateway.client import ApiError, MissionControlClient
from tests.e2e.conftest import (
    RUN_STATE_FIELDS,
    RunningSystem,
    consumers_idle,
    event_counts,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def _seed_000(mc: MissionControlClient) -> tuple[str, Any]:
    """Steps 1 and 2 run; step 3 would push the run past 10,000 tokens."""
    run = mc.start_run(agent_id="code-review-agent").run_id
    for idx, (inp, out) in enumerate([(300, 200), (2000, 3000)], start=1):
        d = mc.admit(
            run,
            idx,
            kind="llm_call",
            model="gpt-4o",
            estimate={"input_tokens": inp, "max_output_tokens": out},
        )
        assert d.outcome == "allow", d
        mc.record_step(
            run,
            idx,
            kind="llm_call",
            model="gpt-4o",
            input_tokens=inp,
            output_tokens=out,
            duration_ms=1200,
        )
    denied = mc.admit(
        run,
        3,
        kind="llm_call",
        model="gpt-4o",
        estimate={"input_tokens": 4500, "max_output_tokens": 5000},
    )
    return run, denied


def _snapshot(mc: MissionControlClient, run: str) -> dict[str, Any]:
    """Every query answer about one run, for comparisons across redelivery and rebuild."""
    return {
        "run": mc.run(run),
        "trace": mc.trace(run),
        "incidents": mc.incidents(run_id=run),
        "costs": mc.costs(group_by="run", run_id=run),
        "export": mc.export(run, format="csv").decode(),
    }


def test_seed_000_step_3_is_denied_the_run_stopped_and_everything_linked(whole_system):
    tenant = _uid("acme")
    mc = whole_system.new_tenant(tenant)
    run, denied = _seed_000(mc)

    assert denied.outcome == "deny"
    assert [r.policy_id for r in denied.reasons] == ["token_limit"]
    assert "10000" in denied.reasons[0].message.replace(",", "")
    assert denied.bundle_digest

    # Stops travel the control lane and steps the bulk lane, so the stop can be queryable a
    # moment before the steps that led to it: wait for both.
    view = wait_for(
        lambda: (
            (r := mc.run(run))["status"] == "stopped_by_policy" and r["tokens_used"] == 5500 and r
        ),
        20,
        "run stopped with its steps projected",
    )
    assert view["stopped_at_step"] == 3
    assert view["violation_policy_id"] == "token_limit"
    assert view["tokens_used"] == 5500

    incidents = wait_for(lambda: mc.incidents(run_id=run)["incidents"], 20, "incident")
    assert len(incidents) == 1
    inc = incidents[0]
    assert (inc["run_id"], inc["policy_id"], inc["step_index"]) == (run, "token_limit", 3)
    assert inc["status"] == "open"
    assert inc["severity"] in ("high", "critical")

    trace = mc.trace(run)
    assert trace["inflection_point"]["step_index"] == 3
    assert trace["inflection_point"]["policy_id"] == "token_limit"
    marked = [s["step_index"] for s in trace["steps"] if s["inflection"]]
    assert marked == [3]

    costs = wait_for(lambda: (c := mc.costs(group_by="run", run_id=run))["rows"] and c, 20, "costs")
    steps_costed = [s for s in trace["steps"] if s["cost"] is not None]
    assert {s["step_index"] for s in steps_costed} <= {1, 2}
    assert costs["rows"][0]["key"] == run
    assert costs["rows"][0]["steps"] >= 1
    wait_for(lambda: len([s for s in mc.trace(run)["steps"] if s["cost"]]) == 2, 20, "both costs")

    replay = mc.replay(run)
    projected = mc.run(run)
    for key in RUN_STATE_FIELDS:
        assert replay["state"][key] == projected[key], key
    assert replay["inflection_point"]["step_index"] == 3

    # A stopped run admits no further steps and records none.
    again = mc.admit(
        run,
        4,
        kind="llm_call",
        model="gpt-4o",
        estimate={"input_tokens": 1, "max_output_tokens": 1},
    )
    assert again.outcome == "deny"
    with pytest.raises(ApiError) as info:
        mc.record_step(run, 4, kind="llm_call", model="gpt-4o", input_tokens=1, output_tokens=1)
    assert info.value.status == 409
    assert len(mc.incidents(run_id=run)["incidents"]) == 1

    # The incident can be acknowledged and resolved.
    # Acknowledging needs no body: the key's identity is recorded as who took it.
    ack = httpx.post(
        f"{whole_system.gateway_url}/v1/incidents/{inc['incident_id']}/acknowledge",
        headers={"Authorization": f"Bearer {whole_system.key_for(tenant)}"},
        timeout=30,
    )
    assert ack.status_code == 200, ack.text
    assert ack.json()["acknowledged_by"].startswith("api-key:")
    mc.resolve_incident(inc["incident_id"], resolution="limit raised for this agent", by="oncall")
    resolved = wait_for(
        lambda: (i := mc.incident(inc["incident_id"]))["status"] == "resolved" and i, 20, "resolved"
    )
    assert resolved["resolution"] == "limit raised for this agent"


def test_a_different_policy_and_step_gives_the_matching_result(whole_system):
    """Custom prices make the cost cap, not the token limit, stop the run, and at step 2."""
    mc = whole_system.new_tenant(_uid("pricey"))
    mc.set_prices(
        [{"model": "house-model", "input_per_token": "0.004", "output_per_token": "0.004"}]
    )
    run = mc.start_run(agent_id="spender").run_id
    d1 = mc.admit(
        run, 1, model="house-model", estimate={"input_tokens": 1000, "max_output_tokens": 500}
    )
    assert d1.outcome == "allow"
    mc.record_step(run, 1, model="house-model", input_tokens=1000, output_tokens=500)  # $6
    d2 = mc.admit(
        run, 2, model="house-model", estimate={"input_tokens": 800, "max_output_tokens": 400}
    )
    assert d2.outcome == "deny"  # $6 + $4.80 > $10 while 2,700 tokens is far below 10,000
    assert [r.policy_id for r in d2.reasons] == ["cost_cap"]
    view = wait_for(lambda: (r := mc.run(run))["status"] == "stopped_by_policy" and r, 20, "stop")
    assert (view["stopped_at_step"], view["violation_policy_id"]) == (2, "cost_cap")
    incidents = wait_for(lambda: mc.incidents(run_id=run)["incidents"], 20, "incident")
    assert [(i["policy_id"], i["step_index"]) for i in incidents] == [("cost_cap", 2)]
    cost = wait_for(lambda: mc.costs(group_by="run", run_id=run)["rows"], 20, "cost")
    assert cost[0]["total_cost_usd"].startswith("6.0")


def test_redelivering_every_event_changes_nothing_and_opens_no_second_incident(whole_system):
    tenant = _uid("redeliver")
    mc = whole_system.new_tenant(tenant)
    run, _ = _seed_000(mc)
    wait_for(lambda: len(mc.incidents(run_id=run)["incidents"]) == 1, 20, "incident")
    wait_for(lambda: len([s for s in mc.trace(run)["steps"] if s["cost"]]) == 2, 20, "costs")
    wait_for(lambda: consumers_idle(whole_system), 30, "consumers idle")
    before = _snapshot(mc, run)
    counts_before = event_counts(whole_system.admin_url, tenant)

    async def redeliver() -> int:
        # Publish every stored event of the tenant again under a new message id: what a
        # redelivery looks like once JetStream's duplicate window has passed.
        # As the relay: the one NATS user that may publish events.
        nc = await connect(
            whole_system.nats_url, "e2e-redeliver", whole_system.nats_credentials(RELAY_USER)
        )
        js = nc.jetstream()
        n = 0
        with psycopg.connect(whole_system.admin_url) as conn:
            rows = conn.execute(
                "SELECT to_jsonb(e) - 'prev_hash' - 'hash' FROM eventstore.events e "
                "WHERE tenant_id = %s ORDER BY position",
                (tenant,),
            ).fetchall()
        for (row,) in rows:
            await js.publish(
                event_subject(tenant, row["event_type"]),
                orjson.dumps(row),
                headers={"Nats-Msg-Id": f"again-{row['event_id']}"},
            )
            n += 1
        await nc.close()
        return n

    assert asyncio.run(redeliver()) == sum(counts_before.values())
    wait_for(lambda: consumers_idle(whole_system), 30, "redeliveries handled")
    assert event_counts(whole_system.admin_url, tenant) == counts_before
    assert _snapshot(mc, run) == before
    assert len(mc.incidents(run_id=run)["incidents"]) == 1


def test_rebuilding_all_projections_from_the_store_gives_the_same_answers(whole_system):
    mc = whole_system.new_tenant(_uid("rebuild"))
    run, _ = _seed_000(mc)
    wait_for(lambda: len(mc.incidents(run_id=run)["incidents"]) == 1, 20, "incident")
    wait_for(lambda: len([s for s in mc.trace(run)["steps"] if s["cost"]]) == 2, 20, "costs")
    wait_for(lambda: consumers_idle(whole_system), 30, "consumers idle")
    before = _snapshot(mc, run)
    runs_before = mc.runs()
    assert whole_system.admin_token
    result = mc.rebuild_projections(whole_system.admin_token)
    assert result
    assert _snapshot(mc, run) == before
    assert mc.runs() == runs_before


def test_events_ingested_while_the_projection_service_is_down_appear_when_it_is_back(whole_system):
    mc = whole_system.new_tenant(_uid("outage"))
    runs = [mc.start_run(agent_id="batcher").run_id for _ in range(5)]
    old = whole_system.child("audit-replay")
    os.kill(int(old["pid"]), signal.SIGKILL)
    items = [
        {
            "run_id": r,
            "step_index": i,
            "kind": "llm_call",
            "model": "gpt-4o-mini",
            "input_tokens": 10,
            "output_tokens": 5,
        }
        for r in runs
        for i in range(1, 201)
    ]
    assert mc.record_steps_batch(items).recorded == 1000
    wait_for(lambda: whole_system.child("audit-replay")["pid"] != old["pid"], 30, "restart")

    def all_there() -> bool:
        got = mc.runs(agent_id="batcher")["runs"]
        return len(got) == 5 and all(
            r["last_step_index"] == 200 and r["tokens_used"] == 3000 for r in got
        )

    wait_for(all_there, 60, "every step projected")


ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/runs/{run}", None),
    ("GET", "/v1/runs/{run}/trace", None),
    ("GET", "/v1/runs/{run}/replay", None),
    ("GET", "/v1/runs/{run}/export?format=csv", None),
    ("POST", "/v1/runs/{run}/admissions", {"step_index": 9, "estimate": {"input_tokens": 1}}),
    ("POST", "/v1/runs/{run}/steps", {"step_index": 9, "input_tokens": 1}),
    ("POST", "/v1/runs/{run}/finish", {"status": "completed"}),
    ("GET", "/v1/incidents/{incident}", None),
    ("POST", "/v1/incidents/{incident}/acknowledge", {"by": "intruder"}),
    ("POST", "/v1/incidents/{incident}/resolve", {"resolution": "not mine", "by": "intruder"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=lambda v: str(v)[:40])
def test_one_tenant_cannot_touch_another_tenants_runs_or_incidents(
    whole_system, victim, method, path, body
):
    import httpx

    intruder_key = whole_system.key_for("intruder")
    url = whole_system.gateway_url + path.format(run=victim["run"], incident=victim["incident"])
    r = httpx.request(
        method, url, json=body, headers={"Authorization": f"Bearer {intruder_key}"}, timeout=30
    )
    assert r.status_code == 404, (r.status_code, r.text)
    assert victim["tenant"] not in r.text


def test_one_tenant_lists_none_of_another_tenants_data(whole_system, victim):
    intruder = MissionControlClient(whole_system.gateway_url, whole_system.key_for("intruder"))
    assert victim["run"] not in json.dumps(intruder.runs())
    assert victim["run"] not in json.dumps(intruder.incidents())
    assert victim["run"] not in json.dumps(intruder.costs(group_by="run"))
    assert victim["run"] not in json.dumps(intruder.costs(group_by="agent"))
    counts = {p["policy_id"]: p["incident_count"] for p in intruder.policies()["policies"]}
    assert counts.get("token_limit", 0) == 0
    # Their own view still shows everything, untouched by the intruder's attempts.
    owner = victim["client"]
    assert owner.run(victim["run"])["status"] == "stopped_by_policy"
    assert owner.incident(victim["incident"])["status"] == "open"


@pytest.fixture(scope="module")
def victim(whole_system: RunningSystem) -> dict[str, Any]:
    tenant = _uid("victim")
    mc = whole_system.new_tenant(tenant)
    whole_system.key_for("intruder")
    run, _ = _seed_000(mc)
    incidents = wait_for(lambda: mc.incidents(run_id=run)["incidents"], 20, "incident")
    wait_for(lambda: mc.run(run)["status"] == "stopped_by_policy", 20, "stopped")
    return {"tenant": tenant, "client": mc, "run": run, "incident": incidents[0]["incident_id"]}
