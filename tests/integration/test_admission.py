"""Policy admission over NATS against the real event store and the real policy bundle."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from libs.contracts import envelope_for, stream_id_for, utcnow
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AdmissionDecided,
    ModelPrice,
    PolicyBundleActivated,
    PolicyViolationDetected,
    PriceTablePublishedV1,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.contracts.registry import decode
from libs.errors import InvalidInput, NotFound
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.pricing import builtin_price_table, price_step, with_overrides
from libs.runtime.service_host import ServiceContext
from libs.settings import Settings
from services.policy_admission.bootstrap import PolicyAdmissionService
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR
from services.policy_admission.handlers import BUNDLE_STREAM
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Admission:
    service: PolicyAdmissionService
    store: EventStore
    rpc: RpcClient
    registry: CollectorRegistry

    async def admit(self, tenant: str, **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.rpc.call(
            "admission", "admit", {"tenant_id": tenant, **body}
        )
        return result


@asynccontextmanager
async def running_admission(
    system: System, bundle_dir: Path | None = None
) -> AsyncIterator[Admission]:
    """The admission service's own start/stop, on a context wired like the service host's."""
    settings = Settings(nats_url=system.nats_url, database_url=system.service_url)
    if bundle_dir is not None:
        settings = settings.model_copy(update={"policy_bundle_dir": bundle_dir})
    pool = await open_pool(system.service_url, max_size=4)
    nc = await connect(system.nats_url, "test-admission")
    await ensure_streams(nc.jetstream())
    service = PolicyAdmissionService()
    ctx = ServiceContext.wire(service.name, settings, nc, pool)
    try:
        await service.start(ctx)
        await wait_until(service.ready, what="policy-admission ready")
        yield Admission(service, ctx.store, RpcClient(nc), ctx.registry)
    finally:
        await service.stop()
        await nc.drain()
        await pool.close()


@pytest.fixture
async def admission(system: System) -> AsyncIterator[Admission]:
    async with running_admission(system) as a:
        yield a


async def _append(store: EventStore, tenant: str, run_id: str, *events: DomainEvent) -> None:
    sid = stream_id_for(tenant, "run", run_id)
    await store.append(
        sid,
        [
            envelope_for(e, tenant_id=tenant, stream_id=sid, correlation_id=run_id, actor="test")
            for e in events
        ],
    )


def _step(run_id: str, i: int, tin: int, tout: int, model: str | None = "gpt-4o") -> StepRecorded:
    return StepRecorded(
        run_id=run_id,
        agent_id="agent-1",
        step_index=i,
        model=model,
        input_tokens=tin,
        output_tokens=tout,
    )


def _estimate(tin: int, tout: int) -> dict[str, int]:
    return {"input_tokens": tin, "max_output_tokens": tout}


async def _decisions(store: EventStore, tenant: str, run_id: str) -> list[DomainEvent]:
    return [decode(e) for e in await store.read_stream(stream_id_for(tenant, "decisions", run_id))]


async def test_step_under_the_limit_is_allowed_and_recorded(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(
        admission.store,
        tenant,
        run_id,
        RunStarted(run_id=run_id, agent_id="agent-1"),
        _step(run_id, 1, 600, 400),
        _step(run_id, 2, 600, 400),
    )
    # 2000 used + 3000 + 5000 lands exactly on the 10000 limit: still allowed.
    result = await admission.admit(
        tenant, run_id=run_id, step_index=3, model="gpt-4o", estimate=_estimate(3000, 5000)
    )
    assert result["outcome"] == "allow"
    assert result["reasons"] == []
    assert result["context"]["tokens_used"] == 2000
    assert result["context"]["steps_recorded"] == 2
    assert result["context"]["status"] == "running"
    assert admission.service.bundle is not None
    assert result["bundle_digest"] == admission.service.bundle.digest

    (decided,) = await _decisions(admission.store, tenant, run_id)
    assert isinstance(decided, AdmissionDecided)
    assert decided.decision_id == result["decision_id"]
    assert decided.outcome == "allow"
    assert decided.bundle_digest == result["bundle_digest"]
    assert decided.agent_id == "agent-1"
    count = admission.registry.get_sample_value(
        "mc_admission_decision_seconds_count", {"outcome": "allow"}
    )
    assert count == 1


async def test_crossing_the_token_limit_is_denied_with_a_violation(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(
        admission.store,
        tenant,
        run_id,
        RunStarted(run_id=run_id, agent_id="agent-1"),
        _step(run_id, 1, 5000, 4000),
    )
    result = await admission.rpc.call(
        "admission",
        "admit",
        {
            "tenant_id": tenant,
            "run_id": run_id,
            "step_index": 2,
            "model": "gpt-4o",
            "estimate": _estimate(600, 500),
        },
        headers={"traceparent": TRACEPARENT, "Mc-Correlation-Id": "corr-deny"},
    )
    assert result["outcome"] == "deny"
    first = result["reasons"][0]
    assert first["policy_id"] == "token_limit"
    assert "10100 tokens" in first["message"]
    assert "limit of 10000" in first["message"]

    stored = await admission.store.read_stream(stream_id_for(tenant, "decisions", run_id))
    assert [e.event_type for e in stored] == ["admission.decided", "policy.violation_detected"]
    assert all(e.correlation_id == "corr-deny" for e in stored)
    assert stored[1].causation_id == str(stored[0].event_id)
    violation = decode(stored[1])
    assert isinstance(violation, PolicyViolationDetected)
    assert violation.violation_id == result["decision_id"]
    assert violation.decision_id == result["decision_id"]
    assert violation.policy_id == "token_limit"
    assert violation.step_index == 2
    assert violation.bundle_digest == result["bundle_digest"]
    assert violation.trace_id == TRACE_ID

    # The run has violated a policy: even a tiny next step is refused until it is stopped.
    again = await admission.admit(tenant, run_id=run_id, step_index=2, estimate=_estimate(1, 1))
    assert again["outcome"] == "deny"
    assert again["reasons"][0]["policy_id"] == "run_state"
    assert again["context"]["violated"] == ["token_limit"]
    # Recorded, but no second violation: one violation, one incident, however often it retries.
    types = [
        e.event_type
        for e in await admission.store.read_stream(stream_id_for(tenant, "decisions", run_id))
    ]
    assert types == ["admission.decided", "policy.violation_detected", "admission.decided"]


async def test_admission_reads_its_own_writes(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    for i in range(1, 201):
        await _append(admission.store, tenant, run_id, _step(run_id, i, 3, 2))
        result = await admission.admit(
            tenant, run_id=run_id, step_index=i + 1, estimate=_estimate(1, 1)
        )
        assert result["context"]["tokens_used"] == 5 * i, f"step {i} was not counted"
        assert result["context"]["last_step_index"] == i
        assert result["outcome"] == "allow"


async def test_stopped_run_is_denied_by_run_state(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(
        admission.store,
        tenant,
        run_id,
        RunStarted(run_id=run_id, agent_id="agent-1"),
        _step(run_id, 1, 10, 10),
        RunStoppedByPolicy(
            run_id=run_id, step_index=2, policy_id="tool_allowlist", decision_id="d", reason="x"
        ),
    )
    result = await admission.admit(tenant, run_id=run_id, step_index=2, estimate=_estimate(1, 1))
    assert result["outcome"] == "deny"
    assert [r["policy_id"] for r in result["reasons"]] == ["run_state"]
    assert "stopped_by_policy" in result["reasons"][0]["message"]
    recorded = await _decisions(admission.store, tenant, run_id)
    assert [type(e) for e in recorded] == [AdmissionDecided]


async def test_cost_cap_uses_the_tenants_prices(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    prices_sid = stream_id_for(tenant, "prices", "table")
    # Published as version 1 (input and output prices only), read through the upcaster.
    published = PriceTablePublishedV1(
        version=1,
        prices=[
            ModelPrice(
                model="house-model",
                input_per_token=Decimal("0.001"),
                output_per_token=Decimal("0.002"),
            )
        ],
    )
    await admission.store.append(
        prices_sid,
        [
            envelope_for(
                published, tenant_id=tenant, stream_id=prices_sid, correlation_id="p", actor="test"
            )
        ],
    )
    run_id = unique("run")
    await _append(
        admission.store,
        tenant,
        run_id,
        RunStarted(run_id=run_id, agent_id="agent-1"),
        _step(run_id, 1, 2000, 1000, model="house-model"),  # $2 + $2
    )
    table = with_overrides(builtin_price_table(), published.prices, published.version)
    spent = price_step(table, "house-model", 2000, 1000, utcnow()).total_cost_usd
    estimate = price_step(table, "house-model", 2000, 2000, utcnow()).total_cost_usd
    assert spent == Decimal(4) and estimate == Decimal(6)
    # $4 so far + $6 estimated is exactly the $10 cap: allowed.
    at_cap = await admission.admit(
        tenant, run_id=run_id, step_index=2, model="house-model", estimate=_estimate(2000, 2000)
    )
    assert at_cap["context"]["cost_usd"] == float(spent)
    assert at_cap["context"]["estimate"]["cost_usd"] == float(estimate)
    assert at_cap["outcome"] == "allow"
    over = await admission.admit(
        tenant, run_id=run_id, step_index=2, model="house-model", estimate=_estimate(2001, 2000)
    )
    assert over["outcome"] == "deny"
    assert over["reasons"][0]["policy_id"] == "cost_cap"


async def test_unpriced_model_is_admitted_with_a_warning(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    result = await admission.admit(
        tenant, run_id=run_id, step_index=1, model="no-such-model-x", estimate=_estimate(10, 10)
    )
    assert result["outcome"] == "warn"
    assert [r["policy_id"] for r in result["reasons"]] == ["cost_cap"]
    assert result["context"]["estimate"]["cost_usd"] is None
    assert not [
        e
        for e in await _decisions(admission.store, tenant, run_id)
        if e.event_type == "policy.violation_detected"
    ]


async def test_unknown_run_and_bad_requests_are_refused(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    with pytest.raises(NotFound):
        await admission.admit(tenant, run_id=unique("nope"), step_index=1, estimate=_estimate(1, 1))
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    with pytest.raises(InvalidInput, match="estimate"):
        await admission.admit(tenant, run_id=run_id, step_index=1)
    with pytest.raises(InvalidInput, match="tool_name"):
        await admission.admit(
            tenant, run_id=run_id, step_index=1, tool_name="x", estimate=_estimate(1, 1)
        )
    with pytest.raises(InvalidInput, match="tenant_id"):
        await admission.admit("Not A Tenant", run_id=run_id, step_index=1, estimate=_estimate(1, 1))
    # The same run is not visible to another tenant.
    with pytest.raises(NotFound):
        await admission.admit(
            unique("other"), run_id=run_id, step_index=1, estimate=_estimate(1, 1)
        )


async def test_policies_lists_the_bundle(admission: Admission) -> None:
    result = await admission.rpc.call("admission", "policies", {"tenant_id": "any"})
    assert admission.service.bundle is not None
    assert result["bundle_digest"] == admission.service.bundle.digest
    assert {p["policy_id"] for p in result["policies"]} == {
        "admission_required",
        "run_state",
        "token_limit",
        "cost_cap",
        "model_allowlist",
        "tool_allowlist",
        # The lifecycle hooks' policies (policy-bundle/rules), listed with admission's.
        "agent_owner",
        "governed_fields",
        "max_steps",
        "memory_retention",
        "model_deprecation",
        "promotion_checks",
        "run_budget_actual",
        "tool_combinations",
    }


async def test_custom_bundle_dir_changes_the_decision(
    system: System, tenant: str, unique: Unique, tmp_path: Path
) -> None:
    custom = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, custom)
    data = json.loads((custom / "data.json").read_text())
    data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] = 1000
    (custom / "data.json").write_text(json.dumps(data))
    run_id = unique("run")
    body = {"run_id": run_id, "step_index": 1, "estimate": _estimate(600, 500)}

    async with running_admission(system) as default:
        await _append(default.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="a"))
        allowed = await default.admit(tenant, **body)
    async with running_admission(system, custom) as small:
        denied = await small.admit(tenant, **body)
        assert small.service.bundle is not None
        activated = decode((await small.store.read_stream(BUNDLE_STREAM))[-1])
    assert isinstance(activated, PolicyBundleActivated)

    assert allowed["outcome"] == "allow"
    assert denied["outcome"] == "deny"
    assert denied["reasons"][0]["policy_id"] == "token_limit"
    assert "limit of 1000" in denied["reasons"][0]["message"]
    assert denied["bundle_digest"] != allowed["bundle_digest"]
    # Starting on the new bundle announced it, with its data, for the projections.
    assert activated.bundle_digest == denied["bundle_digest"]
    assert activated.data == data


async def test_bundle_activation_is_recorded_once_per_digest(system: System) -> None:
    async with running_admission(system) as first:
        events = await first.store.read_stream(BUNDLE_STREAM)
        assert first.service.bundle is not None
        digest = first.service.bundle.digest
    last = decode(events[-1])
    assert isinstance(last, PolicyBundleActivated)
    assert last.bundle_digest == digest
    assert {p.policy_id for p in last.policies} >= {"token_limit", "run_state"}
    async with running_admission(system) as second:
        again = await second.store.read_stream(BUNDLE_STREAM)
    assert len(again) == len(events)


async def test_parallel_admissions_cannot_overrun_the_token_limit_together(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    # Ten steps asked for at once, 2,000 tokens each, none recorded yet: only five fit in 10,000.
    answers = await asyncio.gather(
        *(
            admission.admit(tenant, run_id=run_id, step_index=i, estimate=_estimate(1000, 1000))
            for i in range(1, 11)
        )
    )
    allowed = [a for a in answers if a["outcome"] == "allow"]
    assert len(allowed) == 5
    denied_by = {a["reasons"][0]["policy_id"] for a in answers if a["outcome"] == "deny"}
    assert "token_limit" in denied_by


async def test_recording_a_step_releases_its_reservation(
    admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    first = await admission.admit(
        tenant, run_id=run_id, step_index=1, estimate=_estimate(3000, 3000)
    )
    assert first["outcome"] == "allow"
    assert first["context"]["tokens_reserved"] == 0
    # Step 1 holds 6,000 tokens until it reports; it actually used only 1,000.
    second = await admission.admit(
        tenant, run_id=run_id, step_index=2, estimate=_estimate(2000, 2000)
    )
    assert second["outcome"] == "allow"
    assert second["context"]["tokens_reserved"] == 6000
    await _append(admission.store, tenant, run_id, _step(run_id, 1, 600, 400))
    third = await admission.admit(
        tenant, run_id=run_id, step_index=3, estimate=_estimate(2000, 2000)
    )
    assert third["outcome"] == "allow"
    assert third["context"]["tokens_used"] == 1000
    assert third["context"]["tokens_reserved"] == 4000  # only step 2's estimate is still held


async def test_reservations_do_not_depend_on_which_replica_or_cache_answers(
    system: System, admission: Admission, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))
    d1 = await admission.admit(tenant, run_id=run_id, step_index=1, estimate=_estimate(3000, 3000))
    d2 = await admission.admit(tenant, run_id=run_id, step_index=2, estimate=_estimate(500, 500))
    assert (d1["outcome"], d2["outcome"]) == ("allow", "allow")
    # Step 2 reports while step 1 (6,000 tokens reserved) is still running.
    await _append(admission.store, tenant, run_id, _step(run_id, 2, 500, 500))
    ask = {"run_id": run_id, "step_index": 3, "estimate": _estimate(2000, 2500)}
    # A second replica with a cold cache must see the same reservation as the warm one.
    async with running_admission(system) as cold:
        from_cold = await cold.service.handler.admit(tenant, ask, {})  # type: ignore[union-attr]
    from_warm = await admission.admit(tenant, **ask)
    assert from_cold["context"]["tokens_reserved"] == 6000
    assert from_warm["context"]["tokens_reserved"] == 6000
    assert from_cold["outcome"] == from_warm["outcome"] == "deny"
