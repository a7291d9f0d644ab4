"""The cost domain: deterministic cost ids, recorded table versions, price validation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts.events import ModelPrice, PriceTablePublished, StepRecorded
from libs.errors import InvalidInput
from libs.pricing import builtin_price_table, with_overrides
from services.cost.domain import (
    cost_id_for,
    decide_cost,
    decide_publish,
    parse_prices,
    price_listing,
)

pytestmark = pytest.mark.unit

AT = datetime(2025, 6, 1, tzinfo=UTC)


def _step(**kw: Any) -> StepRecorded:
    base: dict[str, Any] = {
        "run_id": "r1",
        "agent_id": "a1",
        "step_index": 2,
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    base.update(kw)
    return StepRecorded(**base)


def test_cost_id_is_a_function_of_the_step_event_id() -> None:
    event_id = uuid.uuid4()
    first = decide_cost(_step(), AT, builtin_price_table(), step_event_id=event_id)
    again = decide_cost(_step(), AT, builtin_price_table(), step_event_id=event_id)
    other = decide_cost(_step(), AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert first.cost_id == again.cost_id == cost_id_for(event_id)
    assert uuid.UUID(first.cost_id).version == 5
    assert other.cost_id != first.cost_id


def test_cost_records_amounts_and_the_table_version_used() -> None:
    cost = decide_cost(_step(), AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert cost.pricing_status == "priced"
    # gpt-4o: 2.50 USD / 1M input, 10.00 USD / 1M output.
    assert cost.input_cost_usd == Decimal("0.0025")
    assert cost.output_cost_usd == Decimal("0.001")
    assert cost.total_cost_usd == Decimal("0.0035")
    assert cost.price_table_version == "builtin-2026.11"
    assert (cost.run_id, cost.agent_id, cost.step_index) == ("r1", "a1", 2)
    assert (cost.model, cost.input_tokens, cost.output_tokens) == ("gpt-4o", 1000, 100)

    override = ModelPrice(
        model="gpt-4o", input_per_token=Decimal("0.000001"), output_per_token=Decimal(0)
    )
    table = with_overrides(builtin_price_table(), [override], 4)
    cheaper = decide_cost(_step(), AT, table, step_event_id=uuid.uuid4())
    assert cheaper.total_cost_usd == Decimal("0.001")
    assert cheaper.price_table_version == "builtin-2026.11+tenant.4"


def test_step_is_priced_at_the_time_it_occurred() -> None:
    later = ModelPrice(
        model="gpt-4o",
        input_per_token=Decimal(0),
        output_per_token=Decimal(0),
        effective_from="2025-07-01T00:00:00+00:00",
    )
    table = with_overrides(builtin_price_table(), [later], 1)
    before = decide_cost(_step(), AT, table, step_event_id=uuid.uuid4())
    after = decide_cost(
        _step(), datetime(2025, 7, 2, tzinfo=UTC), table, step_event_id=uuid.uuid4()
    )
    assert before.total_cost_usd == Decimal("0.0035")
    assert after.total_cost_usd == Decimal(0)


def test_unknown_and_missing_models() -> None:
    unpriced = decide_cost(
        _step(model="secret-llm"), AT, builtin_price_table(), step_event_id=uuid.uuid4()
    )
    assert unpriced.pricing_status == "unpriced"
    assert unpriced.total_cost_usd is None and unpriced.input_cost_usd is None
    # The JSON payload carries explicit nulls, not zeros.
    assert unpriced.model_dump(mode="json")["total_cost_usd"] is None
    tool = decide_cost(
        _step(model=None, kind="tool_call", tool="search"),
        AT,
        builtin_price_table(),
        step_event_id=uuid.uuid4(),
    )
    assert tool.pricing_status == "no_model"
    assert tool.total_cost_usd == 0


def test_parse_prices_accepts_numbers_and_strings_exactly() -> None:
    prices = parse_prices(
        [
            {"model": " custom ", "input_per_token": 2.5e-06, "output_per_token": "0.00001"},
            {
                "model": "custom",
                "input_per_token": 0,
                "output_per_token": 0,
                "effective_from": "2026-01-01T00:00:00",
            },
        ]
    )
    assert prices[0].model == "custom"
    assert prices[0].input_per_token == Decimal("0.0000025")
    assert prices[0].output_per_token == Decimal("0.00001")
    assert prices[0].effective_from == "1970-01-01T00:00:00+00:00"
    assert prices[1].effective_from == "2026-01-01T00:00:00+00:00"  # naive means UTC
    assert parse_prices([]) == []


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"model": "", "input_per_token": 1, "output_per_token": 1}, "model"),
        ({"model": "  ", "input_per_token": 1, "output_per_token": 1}, "model"),
        ({"input_per_token": 1, "output_per_token": 1}, "model"),
        ({"model": "m", "input_per_token": -1, "output_per_token": 1}, "negative"),
        ({"model": "m", "input_per_token": 1, "output_per_token": "-0.1"}, "negative"),
        ({"model": "m", "input_per_token": "abc", "output_per_token": 1}, "not a number"),
        ({"model": "m", "input_per_token": "NaN", "output_per_token": 1}, "finite"),
        ({"model": "m", "input_per_token": True, "output_per_token": 1}, "number"),
        ({"model": "m", "output_per_token": 1}, "required"),
        (
            {"model": "m", "input_per_token": 1, "output_per_token": 1, "effective_from": "soon"},
            "ISO 8601",
        ),
        ({"model": "m", "input_per_token": 1, "output_per_token": 1, "extra": 1}, "unknown"),
    ],
)
def test_parse_prices_rejects_bad_items(item: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_prices([item])


def test_parse_prices_rejects_non_lists_and_duplicates() -> None:
    with pytest.raises(InvalidInput):
        parse_prices({"model": "m"})
    dup = {"model": "m", "input_per_token": 1, "output_per_token": 1}
    with pytest.raises(InvalidInput, match="twice"):
        parse_prices([dup, dup])


def test_publish_is_one_version_after_the_current() -> None:
    prices = parse_prices([{"model": "m", "input_per_token": 1, "output_per_token": 2}])
    event = decide_publish(0, prices)
    assert isinstance(event, PriceTablePublished)
    assert event.version == 1 and event.prices == prices
    assert decide_publish(7, []).version == 8


def test_price_listing_marks_builtin_and_override_rows() -> None:
    empty = price_listing(None)
    assert empty["version"] == 0
    assert empty["price_table_version"] == "builtin-2026.11"
    assert {r["source"] for r in empty["prices"]} == {"builtin"}

    prices = parse_prices([{"model": "custom", "input_per_token": "1.5E-7", "output_per_token": 0}])
    listing = price_listing(decide_publish(1, prices))
    assert listing["version"] == 2
    assert listing["price_table_version"] == "builtin-2026.11+tenant.2"
    overrides = [r for r in listing["prices"] if r["source"] == "override"]
    assert overrides == [
        {
            "model": "custom",
            "input_per_token": "0.00000015",
            "output_per_token": "0",
            "effective_from": "1970-01-01T00:00:00+00:00",
            "source": "override",
        }
    ]
    assert len(listing["prices"]) == len(empty["prices"]) + 1
