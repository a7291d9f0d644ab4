"""Exact cost through the public API of a whole running system.

Prices per component with effective dates (``PUT /v1/prices``), steps recorded with the usage a
provider reported (mapped by ``libs.usage`` from a recorded Anthropic payload) and the provider's
own cost, and the cost queries that show every component and flag the difference.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from libs.usage import from_anthropic
from tests.e2e.conftest import RunningSystem, wait_for
from tests.unit.test_usage import _load

pytestmark = pytest.mark.e2e


def test_a_step_is_priced_per_component_with_the_prices_in_force_and_checked_against_the_provider(
    whole_system: RunningSystem,
) -> None:
    tenant = f"exact{uuid.uuid4().hex[:10]}"
    mc = whole_system.new_tenant(tenant)
    now = datetime.now(UTC)
    mc.set_prices(
        [
            # In force now: named cache and reasoning prices.
            {"model": "house-llm", "input_per_token": "0.000003",
             "cached_input_per_token": "0.0000003", "cache_write_per_token": "0.00000375",
             "output_per_token": "0.000015", "reasoning_per_token": "0.00002",
             "effective_from": (now - timedelta(hours=1)).isoformat()},
            # Not yet in force: ten times dearer from tomorrow, never applied to today's step.
            {"model": "house-llm", "input_per_token": "0.00003", "output_per_token": "0.00015",
             "effective_from": (now + timedelta(days=1)).isoformat()},
        ]
    )  # fmt: skip
    listing = {
        r["effective_from"][:10]: r for r in mc.prices()["prices"] if r["model"] == "house-llm"
    }
    tomorrow = listing[(now + timedelta(days=1)).date().isoformat()]
    # Unnamed components are published explicitly: cache at the input price, reasoning as output.
    assert tomorrow["cached_input_per_token"] == tomorrow["input_per_token"] == "0.00003"
    assert tomorrow["reasoning_per_token"] == tomorrow["output_per_token"] == "0.00015"

    run = mc.start_run(agent_id="writer").run_id
    usage = from_anthropic(_load("anthropic_cache_write.json")["response"])
    assert mc.admit(run, 1, model="house-llm", input_tokens=usage.input_tokens).outcome == "allow"
    # The provider said $0.0150; our prices make it $0.013638: flagged, both kept.
    mc.record_step(run, 1, model="house-llm", provider_cost_usd="0.0150", **usage.fields())

    # Counts that cannot add up (Anthropic's input_tokens taken as the total) are a 422.
    bad = httpx.post(
        f"{whole_system.gateway_url}/v1/runs/{run}/steps",
        headers={"Authorization": f"Bearer {whole_system.key_for(tenant)}"},
        json={"step_index": 2, "model": "house-llm", "input_tokens": 21,
              "cache_write_tokens": 2048, "output_tokens": 393},
        timeout=30,
    )  # fmt: skip
    assert bad.status_code == 422, bad.text
    assert "exceed input_tokens" in bad.json()["error"]["message"]

    rows = wait_for(lambda: mc.costs(group_by="model", run_id=run)["rows"], 30, "the cost")
    (row,) = rows
    assert row["key"] == "house-llm"
    assert (row["input_tokens"], row["cache_write_tokens"], row["output_tokens"]) == (
        2069, 2048, 393,
    )  # fmt: skip
    assert row["cost_components"] == {
        "input": "0.0000630000",
        "cached_input": "0.0000000000",
        "cache_write": "0.0076800000",
        "output": "0.0058950000",
        "reasoning": "0.0000000000",
    }
    assert Decimal(row["total_cost_usd"]) == Decimal("0.013638")
    assert row["provider_cost_usd"] == "0.0150000000"
    assert row["cost_mismatches"] == 1
    (step,) = [s for s in mc.trace(run)["steps"] if s["cost"]]
    assert step["cost"]["cache_write_cost_usd"] == "0.0076800000"
    assert step["cost"]["cost_difference_usd"] == "0.0013620000"
    assert step["cost"]["cost_mismatch"] is True
    (day,) = mc.costs(group_by="day", run_id=run)["rows"]
    assert day["key"] in {now.date().isoformat(), datetime.now(UTC).date().isoformat()}
    assert day["total_cost_usd"] == row["total_cost_usd"]
