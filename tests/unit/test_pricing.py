"""Price tables: built-in lookup, name normalisation, effective dates, overrides, step pricing."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from libs.contracts import envelope_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import ModelPrice, PriceTablePublished, PriceTablePublishedV1
from libs.contracts.registry import decode
from libs.domain.prices import builtin_prices, fold_prices
from libs.eventbus.repository import Recorded
from libs.pricing import (
    BUILTIN_VERSION,
    PriceRow,
    PriceTable,
    builtin_price_table,
    estimate_cost,
    normalise_model,
    price_step,
    with_overrides,
)

pytestmark = pytest.mark.unit

AT = datetime(2025, 6, 1, tzinfo=UTC)
MILLION = Decimal(1_000_000)


def _published(version: int, prices: list[ModelPrice]) -> EventEnvelope:
    # Stored as version 1 (input and output prices only): read through the v1 -> v2 upcaster.
    return envelope_for(
        PriceTablePublishedV1(version=version, prices=prices),
        tenant_id="acme",
        stream_id="acme/prices/table",
        correlation_id="c",
        actor="test",
    )


def test_builtin_table_prices_every_listed_model_per_token() -> None:
    table = builtin_price_table()
    assert table.version == BUILTIN_VERSION == "builtin-2026.11"
    for model in (
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "o3",
        "o4-mini",
        "claude-sonnet-4",
        "claude-opus-4",
        "claude-3-5-haiku",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "mistral-large",
        "llama-3.1-70b",
    ):
        row = table.lookup(model, AT)
        assert row is not None, model
        assert row.effective_from == datetime(2024, 1, 1, tzinfo=UTC)
    gpt4o = table.lookup("gpt-4o", AT)
    assert gpt4o is not None
    assert gpt4o.input_per_token == Decimal("2.50") / MILLION
    assert gpt4o.output_per_token == Decimal("10.00") / MILLION


def test_builtin_prices_do_not_apply_before_their_effective_date() -> None:
    assert builtin_price_table().lookup("gpt-4o", datetime(2023, 12, 31, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("GPT-4o-Mini-2024-07-18", "gpt-4o-mini"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4@20250514", "claude-opus-4"),
        ("openai/gpt-4.1", "gpt-4.1"),
        ("mistral-large-2411", "mistral-large"),
        ("mistral-large-latest", "mistral-large"),
        ("llama-3.1-70b", "llama-3.1-70b"),
    ],
)
def test_dated_and_cased_names_price_as_their_family(name: str, family: str) -> None:
    assert normalise_model(name) == family
    table = builtin_price_table()
    assert table.lookup(name, AT) == table.lookup(family, AT)
    assert table.lookup(name, AT) is not None


def test_exact_name_wins_over_the_normalised_family() -> None:
    snapshot = ModelPrice(
        model="gpt-4o-2024-05-13",
        input_per_token=Decimal("0.000005"),
        output_per_token=Decimal("0.000015"),
        effective_from="2024-01-01T00:00:00+00:00",
    )
    table = with_overrides(builtin_price_table(), [snapshot], 1)
    exact = table.lookup("gpt-4o-2024-05-13", AT)
    assert exact is not None and exact.input_per_token == Decimal("0.000005")
    family = table.lookup("gpt-4o-2024-08-06", AT)
    assert family is not None and family.input_per_token == Decimal("2.50") / MILLION


def test_effective_dates_choose_the_row_in_force_at_the_time() -> None:
    rows = (
        PriceRow("m", Decimal(1), Decimal(1), datetime(2024, 1, 1, tzinfo=UTC)),
        PriceRow("m", Decimal(2), Decimal(2), datetime(2025, 1, 1, tzinfo=UTC)),
        PriceRow("m", Decimal(3), Decimal(3), datetime(2026, 1, 1, tzinfo=UTC)),
    )
    table = PriceTable("t", rows)

    def price_at(y: int, m: int, d: int) -> Decimal | None:
        row = table.lookup("m", datetime(y, m, d, tzinfo=UTC))
        return None if row is None else row.input_per_token

    assert price_at(2023, 6, 1) is None
    assert price_at(2024, 6, 1) == 1
    assert price_at(2025, 1, 1) == 2  # effective_from is inclusive
    assert price_at(2025, 12, 31) == 2
    assert price_at(2030, 1, 1) == 3
    # A naive instant is read as UTC.
    assert table.lookup("m", datetime(2025, 1, 1)) == rows[1]


def test_overrides_win_from_their_date_and_bump_the_version() -> None:
    cheaper = ModelPrice(
        model="gpt-4o",
        input_per_token=Decimal("0.000001"),
        output_per_token=Decimal("0.000004"),
        effective_from="2025-03-01T00:00:00+00:00",
    )
    table = with_overrides(builtin_price_table(), [cheaper], 3)
    assert table.version == "builtin-2026.11+tenant.3"
    before = table.lookup("gpt-4o", datetime(2025, 2, 28, tzinfo=UTC))
    after = table.lookup("gpt-4o", datetime(2025, 3, 1, tzinfo=UTC))
    assert before is not None and before.input_per_token == Decimal("2.50") / MILLION
    assert after is not None and after.input_per_token == Decimal("0.000001")


def test_undated_override_applies_always_even_against_a_later_builtin_row() -> None:
    undated = ModelPrice(
        model="GPT-4o", input_per_token=Decimal("0.000001"), output_per_token=Decimal(0)
    )
    table = with_overrides(builtin_price_table(), [undated], 1)
    for at in (datetime(2023, 1, 1, tzinfo=UTC), AT):
        row = table.lookup("gpt-4o-2024-08-06", at)
        assert row is not None and row.input_per_token == Decimal("0.000001"), at
    # The sibling family is untouched.
    mini = table.lookup("gpt-4o-mini", AT)
    assert mini is not None and mini.input_per_token == Decimal("0.15") / MILLION


def test_snapshot_override_does_not_reprice_sibling_snapshots() -> None:
    snapshot = ModelPrice(
        model="gpt-4o-2024-05-13",
        input_per_token=Decimal("0.000005"),
        output_per_token=Decimal("0.000015"),
        effective_from="2025-01-01T00:00:00+00:00",
    )
    table = with_overrides(builtin_price_table(), [snapshot], 1)
    sibling = table.lookup("gpt-4o-2024-08-06", AT)
    assert sibling is not None and sibling.input_per_token == Decimal("2.50") / MILLION
    own = table.lookup("gpt-4o-2024-05-13", AT)
    assert own is not None and own.input_per_token == Decimal("0.000005")


def test_override_on_the_same_date_as_the_builtin_wins() -> None:
    same_day = ModelPrice(
        model="claude-sonnet-4",
        input_per_token=Decimal("0.000002"),
        output_per_token=Decimal("0.00001"),
        effective_from="2024-01-01T00:00:00+00:00",
    )
    table = with_overrides(builtin_price_table(), [same_day], 1)
    row = table.lookup("claude-sonnet-4-20250514", AT)
    assert row is not None and row.output_per_token == Decimal("0.00001")


def test_the_price_table_fold_keeps_the_latest_published_version() -> None:
    v1 = [ModelPrice(model="custom", input_per_token=Decimal(1), output_per_token=Decimal(1))]
    v2 = [ModelPrice(model="custom", input_per_token=Decimal(2), output_per_token=Decimal(2))]
    published = [_published(2, v2), _published(1, v1)]
    # Out of order on purpose: the version number decides, not the order of the events.
    state = fold_prices(builtin_prices(), [Recorded(decode(e), e) for e in published])
    assert state.table.version == "builtin-2026.11+tenant.2"
    row = state.table.lookup("custom", AT)
    assert row is not None and row.input_per_token == 2
    assert fold_prices(builtin_prices(), []).table == builtin_price_table()


def test_unknown_model_is_unpriced_never_zero() -> None:
    price = price_step(builtin_price_table(), "my-private-model", 1000, 500, AT)
    assert price.pricing_status == "unpriced"
    assert price.input_cost_usd is None
    assert price.output_cost_usd is None
    assert price.total_cost_usd is None
    assert price.price_table_version == BUILTIN_VERSION
    assert estimate_cost(builtin_price_table(), "my-private-model", 1000, 500, AT) is None


def test_step_without_model_costs_zero_as_no_model() -> None:
    price = price_step(builtin_price_table(), None, 1000, 500, AT)
    assert price.pricing_status == "no_model"
    assert price.input_cost_usd == price.output_cost_usd == price.total_cost_usd == Decimal(0)
    assert isinstance(price.total_cost_usd, Decimal)


def test_priced_step_multiplies_tokens_by_per_token_prices() -> None:
    price = price_step(builtin_price_table(), "gpt-4o-mini", 1_000_000, 2_000_000, AT)
    assert price.pricing_status == "priced"
    assert price.input_cost_usd == Decimal("0.15")
    assert price.output_cost_usd == Decimal("1.20")
    assert price.total_cost_usd == Decimal("1.35")
    assert estimate_cost(builtin_price_table(), "gpt-4o-mini", 1_000_000, 2_000_000, AT) == Decimal(
        "1.35"
    )


def test_costs_are_quantised_to_a_ten_billionth_of_a_dollar() -> None:
    odd = PriceTable(
        "t",
        (
            PriceRow(
                "m",
                Decimal("0.00000000004"),  # rounds down at 1 token
                Decimal("0.000000000151"),  # 3 tokens: 4.53e-10 rounds to 5e-10
                datetime(2024, 1, 1, tzinfo=UTC),
            ),
        ),
    )
    price = price_step(odd, "m", 1, 3, AT)
    assert price.input_cost_usd == Decimal(0)
    assert price.output_cost_usd == Decimal("5E-10")
    for amount in (price.input_cost_usd, price.output_cost_usd, price.total_cost_usd):
        assert amount is not None and amount.as_tuple().exponent == -10
    assert price.total_cost_usd == price.input_cost_usd + price.output_cost_usd


def test_a_v1_price_table_reads_as_components_priced_as_they_were_charged() -> None:
    old = [ModelPrice(model="custom", input_per_token=Decimal(1), output_per_token=Decimal(3))]
    published = decode(_published(1, old))
    assert isinstance(published, PriceTablePublished)
    (price,) = published.prices
    # A v1 table priced every prompt token at input and every generated token at output.
    assert price.cached_input_per_token == price.cache_write_per_token == Decimal(1)
    assert price.reasoning_per_token == Decimal(3)
    state = fold_prices(builtin_prices(), [Recorded(published, _published(1, old))])
    step = price_step(state.table, "custom", 10, 4, AT, cached_input_tokens=6, reasoning_tokens=1)
    assert step.total_cost_usd == Decimal(10 * 1 + 4 * 3)


def test_every_builtin_row_names_its_cache_and_reasoning_prices() -> None:
    for row in builtin_price_table().rows:
        assert row.cached_input_per_token is not None, row.model
        assert row.cache_write_per_token is not None, row.model
        assert row.reasoning_per_token is not None, row.model
        # A cache read never costs more than an uncached token, and is never free.
        assert 0 < row.cached_input_per_token <= row.input_per_token, row.model
