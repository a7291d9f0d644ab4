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
            "cached_input_per_token": "0.00000015",
            "cache_write_per_token": "0.00000015",
            "output_per_token": "0",
            "reasoning_per_token": "0",
            "effective_from": "1970-01-01T00:00:00+00:00",
            "source": "override",
        }
    ]
    assert len(listing["prices"]) == len(empty["prices"]) + 1


# --- exact cost: components, effective dates, the provider's own figure --------------------------


def test_each_usage_component_is_priced_at_its_own_price() -> None:
    step = _step(
        model="claude-sonnet-4-20250514",
        input_tokens=10_000,
        cached_input_tokens=6_000,
        cache_write_tokens=3_000,
        output_tokens=2_000,
        reasoning_tokens=500,
    )
    cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
    per_m = Decimal(1_000_000)
    assert cost.input_cost_usd == 1_000 * Decimal("3.00") / per_m
    assert cost.cached_input_cost_usd == 6_000 * Decimal("0.30") / per_m
    assert cost.cache_write_cost_usd == 3_000 * Decimal("3.75") / per_m
    assert cost.output_cost_usd == 1_500 * Decimal("15.00") / per_m
    assert cost.reasoning_cost_usd == 500 * Decimal("15.00") / per_m
    assert cost.total_cost_usd == sum(
        (
            cost.input_cost_usd, cost.cached_input_cost_usd, cost.cache_write_cost_usd,
            cost.output_cost_usd, cost.reasoning_cost_usd,
        ),
        Decimal(0),
    )  # fmt: skip
    assert (cost.cached_input_tokens, cost.cache_write_tokens, cost.reasoning_tokens) == (
        6_000, 3_000, 500,
    )  # fmt: skip


def test_a_step_is_priced_with_the_component_prices_in_force_at_its_time() -> None:
    prices = parse_prices(
        [
            {"model": "house", "input_per_token": "0.000002", "output_per_token": "0.000008",
             "cached_input_per_token": "0.0000005", "reasoning_per_token": "0.00001"},
            {"model": "house", "input_per_token": "0.000001", "output_per_token": "0.000004",
             "cached_input_per_token": "0.0000001", "effective_from": "2025-07-01T00:00:00Z"},
        ]
    )  # fmt: skip
    table = with_overrides(builtin_price_table(), prices, 3)
    step = _step(model="house", input_tokens=1000, cached_input_tokens=800, output_tokens=100,
                 reasoning_tokens=40)  # fmt: skip
    june = decide_cost(step, AT, table, step_event_id=uuid.uuid4())
    july = decide_cost(step, datetime(2025, 7, 1, tzinfo=UTC), table, step_event_id=uuid.uuid4())
    assert june.input_cost_usd == Decimal("0.0004")  # 200 x 2e-6
    assert june.cached_input_cost_usd == Decimal("0.0004")  # 800 x 5e-7
    assert june.reasoning_cost_usd == Decimal("0.0004")  # 40 x 1e-5
    assert july.input_cost_usd == Decimal("0.0002")
    assert july.cached_input_cost_usd == Decimal("0.00008")
    # The July price named no reasoning price: reasoning is billed as output, explicitly.
    assert prices[1].reasoning_per_token == prices[1].output_per_token
    assert july.reasoning_cost_usd == Decimal("0.00016")


def test_unnamed_components_default_to_input_and_output_prices() -> None:
    (price,) = parse_prices([{"model": "m", "input_per_token": "0.000003",
                              "output_per_token": "0.000015"}])  # fmt: skip
    assert price.cached_input_per_token == price.cache_write_per_token == Decimal("0.000003")
    assert price.reasoning_per_token == Decimal("0.000015")
    with pytest.raises(InvalidInput, match=r"prices\[0\]\.cache_write_per_token must not be"):
        parse_prices([{"model": "m", "input_per_token": 1, "output_per_token": 1,
                       "cache_write_per_token": -1}])  # fmt: skip


def test_the_listing_names_every_component() -> None:
    listing = price_listing(None)
    row = next(r for r in listing["prices"] if r["model"] == "claude-sonnet-4")
    assert row["cached_input_per_token"] == "0.0000003"
    assert row["cache_write_per_token"] == "0.00000375"
    assert row["reasoning_per_token"] == row["output_per_token"] == "0.000015"


@pytest.mark.parametrize(
    ("provider", "difference", "flagged"),
    [
        ("0.0035", "0", False),
        ("0.00353", "0.00003", False),  # within 1 % (rounding, a price a hair off)
        ("0.0036", "0.0001", True),  # beyond 1 %
        ("0.0030", "-0.0005", True),
    ],
)
def test_the_provider_cost_is_kept_and_a_difference_beyond_tolerance_flagged(
    provider: str, difference: str, flagged: bool
) -> None:
    step = _step(provider_cost_usd=Decimal(provider))
    cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert cost.total_cost_usd == Decimal("0.0035")
    assert cost.provider_cost_usd == Decimal(provider)
    assert cost.cost_difference_usd == Decimal(difference)
    assert cost.cost_mismatch is flagged


def test_tiny_costs_are_compared_with_an_absolute_tolerance() -> None:
    step = _step(input_tokens=1, output_tokens=0, provider_cost_usd=Decimal("0.000003"))
    cost = decide_cost(step, AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert cost.total_cost_usd == Decimal("0.0000025")
    assert cost.cost_mismatch is False  # 5e-7 apart: below 1e-6 USD
    none = decide_cost(_step(), AT, builtin_price_table(), step_event_id=uuid.uuid4())
    assert (none.provider_cost_usd, none.cost_difference_usd, none.cost_mismatch) == (
        None, None, False,
    )  # fmt: skip
    unpriced = decide_cost(
        _step(model="secret-llm", provider_cost_usd=Decimal("0.01")),
        AT,
        builtin_price_table(),
        step_event_id=uuid.uuid4(),
    )
    assert unpriced.provider_cost_usd == Decimal("0.01")
    assert (unpriced.cost_difference_usd, unpriced.cost_mismatch) == (None, False)
