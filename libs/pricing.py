"""Model prices and the cost of a step: pure functions shared by cost and policy-admission.

A :class:`PriceTable` is a versioned list of per-token USD prices, each valid from a date. The
built-in table carries list prices; a tenant can publish its own prices (negotiated discounts,
private deployments, models the built-in table does not know), which win over the built-ins from
their effective date on. A tenant's table is derived from its ``cost.price_table_published``
events, so any cost can be recomputed later from the log with the same inputs.

An unknown model is never priced at zero: :func:`price_step` reports it as ``unpriced`` with no
amounts, so a missing price shows up as a gap instead of an understated bill.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal, Protocol

from libs.usage import UsageCounts, usage_problem

# The cache and reasoning prices joined the table under the same version: every step costed
# before them had no cache or reasoning tokens, and such a step costs the same with them.
BUILTIN_VERSION = "builtin-2026.11"
PRICES_EVENT = "cost.price_table_published"
# Amounts are kept to 1e-10 USD: a single token of the cheapest model costs ~1e-8 USD, so this
# keeps per-step costs exact enough to sum millions of steps without drift.
QUANTUM = Decimal("1e-10")

PricingStatus = Literal["priced", "unpriced", "no_model"]

_PER_MILLION = Decimal(1_000_000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Dated snapshots ("-2024-08-06", "-20250514", Vertex's "@20250514") and Mistral's "-2411"
# year-month releases price like their family; "-latest" aliases too.
_DATED_SUFFIX = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|2\d(?:0[1-9]|1[0-2]))|-latest)$")


@dataclass(frozen=True)
class PriceRow:
    """USD per token of one model, valid from ``effective_from`` until a later row replaces it.

    ``input_per_token`` prices uncached prompt tokens and ``output_per_token`` generated tokens
    other than reasoning. The other components default to what a provider without them charges:
    cache reads and writes at the input price, reasoning at the output price.
    """

    model: str
    input_per_token: Decimal
    output_per_token: Decimal
    effective_from: datetime
    cached_input_per_token: Decimal | None = None
    cache_write_per_token: Decimal | None = None
    reasoning_per_token: Decimal | None = None

    @property
    def cached_input(self) -> Decimal:
        """USD per prompt token read from the cache."""
        return _or(self.cached_input_per_token, self.input_per_token)

    @property
    def cache_write(self) -> Decimal:
        """USD per prompt token written to the cache."""
        return _or(self.cache_write_per_token, self.input_per_token)

    @property
    def reasoning(self) -> Decimal:
        """USD per reasoning token."""
        return _or(self.reasoning_per_token, self.output_per_token)


def _or(price: Decimal | None, default: Decimal) -> Decimal:
    return default if price is None else price


class ModelPriceLike(Protocol):
    """What :func:`with_overrides` needs of a price (``libs.contracts.events.ComponentPrice`` fits;
    its ``cached_input_per_token``, ``cache_write_per_token`` and ``reasoning_per_token`` are read
    when present)."""

    @property
    def model(self) -> str: ...

    @property
    def input_per_token(self) -> Decimal: ...

    @property
    def output_per_token(self) -> Decimal: ...

    @property
    def effective_from(self) -> str | datetime: ...


def normalise_model(model: str) -> str:
    """The family name a model id prices as: lower case, no provider prefix, no dated suffix.

    ``"OpenAI/GPT-4o-2024-08-06"`` → ``"gpt-4o"``; ``"claude-sonnet-4-20250514"`` →
    ``"claude-sonnet-4"``.
    """
    name = model.strip().lower()
    if "/" in name:
        name = name.rsplit("/", 1)[1]
    return _DATED_SUFFIX.sub("", name)


def _exact_key(model: str) -> str:
    return model.strip().lower()


def _is_family(model: str) -> bool:
    """Whether ``model`` names a family (no provider prefix, no dated suffix)."""
    return normalise_model(model) == _exact_key(model)


def _utc(at: datetime) -> datetime:
    # Naive datetimes are taken as UTC rather than local time, so results never depend on the host.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


@dataclass(frozen=True)
class PriceTable:
    """A versioned set of price rows; later rows win ties on the same model and date."""

    version: str
    rows: tuple[PriceRow, ...]

    def lookup(self, model: str, at: datetime) -> PriceRow | None:
        """The row of ``model`` with the latest ``effective_from <= at``, or ``None``.

        Names are tried from the most to the least specific, and the first kind that has a row in
        force at ``at`` decides:

        1. the exact name (ignoring case and surrounding blanks), so a tenant can price one dated
           snapshot differently from its family;
        2. family rows (undated names) of the same normalised name, e.g. ``gpt-4o`` for
           ``gpt-4o-2024-08-06``;
        3. any row of the same normalised name (a sibling snapshot priced by the tenant).
        """
        when = _utc(at)
        key = _exact_key(model)
        family = normalise_model(model)
        stages: tuple[Callable[[str], bool], ...] = (
            lambda name: _exact_key(name) == key,
            lambda name: _is_family(name) and normalise_model(name) == family,
            lambda name: normalise_model(name) == family,
        )
        for matches in stages:
            found = self._latest(matches, when)
            if found is not None:
                return found
        return None

    def _latest(self, matches: Callable[[str], bool], when: datetime) -> PriceRow | None:
        best: PriceRow | None = None
        for row in self.rows:
            if not matches(row.model) or _utc(row.effective_from) > when:
                continue
            # ">=" so that on equal dates the later row (a tenant override) wins.
            if best is None or _utc(row.effective_from) >= _utc(best.effective_from):
                best = row
        return best


def _per_token(per_million: str) -> Decimal:
    return Decimal(per_million) / _PER_MILLION


_BUILTIN_FROM = datetime(2024, 1, 1, tzinfo=UTC)

# List prices in USD per million tokens, as published by the providers at the date of
# BUILTIN_VERSION (standard tier, no batch discount), per component: uncached input, cache read,
# cache write, output, reasoning. OpenAI and Gemini charge nothing extra to write their caches
# (Gemini's explicit caches are billed for storage, not per request), so a write costs the input
# price; Anthropic's is its 5-minute cache write. Every provider here bills reasoning as output,
# and the table says so per model rather than assume it. Models without a cache discount price
# cache reads as input. Open-weight models have no single list price; the figure is a typical
# hosted price. Every tenant can override any row with the cost service's ``set_prices`` request.
_BUILTIN_PER_MILLION: tuple[tuple[str, str, str, str, str, str], ...] = (
    # model, input, cached input, cache write, output, reasoning
    # OpenAI
    ("gpt-4o", "2.50", "1.25", "2.50", "10.00", "10.00"),
    ("gpt-4o-mini", "0.15", "0.075", "0.15", "0.60", "0.60"),
    ("gpt-4.1", "2.00", "0.50", "2.00", "8.00", "8.00"),
    ("gpt-4.1-mini", "0.40", "0.10", "0.40", "1.60", "1.60"),
    ("o3", "2.00", "0.50", "2.00", "8.00", "8.00"),
    ("o4-mini", "1.10", "0.275", "1.10", "4.40", "4.40"),
    # Anthropic
    ("claude-sonnet-4", "3.00", "0.30", "3.75", "15.00", "15.00"),
    ("claude-opus-4", "15.00", "1.50", "18.75", "75.00", "75.00"),
    ("claude-3-5-haiku", "0.80", "0.08", "1.00", "4.00", "4.00"),
    ("claude-haiku-4-5", "1.00", "0.10", "1.25", "5.00", "5.00"),
    # Google
    ("gemini-2.5-pro", "1.25", "0.125", "1.25", "10.00", "10.00"),
    ("gemini-2.5-flash", "0.30", "0.03", "0.30", "2.50", "2.50"),
    # Mistral
    ("mistral-large", "2.00", "2.00", "2.00", "6.00", "6.00"),
    # Meta (open weights, typical hosted price)
    ("llama-3.1-70b", "0.88", "0.88", "0.88", "0.88", "0.88"),
)


def builtin_price_table() -> PriceTable:
    """The built-in list prices (version :data:`BUILTIN_VERSION`), effective from 2024-01-01."""
    return PriceTable(
        version=BUILTIN_VERSION,
        rows=tuple(
            PriceRow(
                model,
                input_per_token=_per_token(inp),
                output_per_token=_per_token(out),
                effective_from=_BUILTIN_FROM,
                cached_input_per_token=_per_token(cached),
                cache_write_per_token=_per_token(write),
                reasoning_per_token=_per_token(reasoning),
            )
            for model, inp, cached, write, out, reasoning in _BUILTIN_PER_MILLION
        ),
    )


def parse_effective_from(value: str | datetime) -> datetime:
    """An ISO 8601 timestamp as an aware datetime (naive means UTC); ``ValueError`` if invalid."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return _utc(when)


def with_overrides(
    base: PriceTable, overrides: Sequence[ModelPriceLike], version: int
) -> PriceTable:
    """``base`` plus a tenant's own prices, which win over the base from their effective dates.

    A tenant price for a model replaces the base rows of that model from its earliest
    ``effective_from`` on: base rows dated on or after it are dropped, so the tenant price
    applies even when the base has a later-dated row (an override without a date applies from
    the epoch, that is, always). Before that date the base price still applies. An override of a
    family name (``gpt-4o``) covers the base rows of that family; an override of a dated or
    prefixed name covers only that exact name.

    The version string is ``<base version>+tenant.<version>``.
    """
    extra = tuple(
        PriceRow(
            model=p.model,
            input_per_token=Decimal(p.input_per_token),
            output_per_token=Decimal(p.output_per_token),
            effective_from=parse_effective_from(p.effective_from),
            cached_input_per_token=_optional_price(p, "cached_input_per_token"),
            cache_write_per_token=_optional_price(p, "cache_write_per_token"),
            reasoning_per_token=_optional_price(p, "reasoning_per_token"),
        )
        for p in overrides
    )
    # Earliest override date per "shadow key": the family for family names, else the exact name.
    first_override: dict[str, datetime] = {}
    for row in extra:
        key = _shadow_key(row.model)
        if key not in first_override or row.effective_from < first_override[key]:
            first_override[key] = row.effective_from
    kept = tuple(
        row
        for row in base.rows
        if not any(
            _utc(row.effective_from) >= since
            for key, since in first_override.items()
            if key in (_exact_key(row.model), _shadow_key(row.model))
        )
    )
    return PriceTable(version=f"{base.version}+tenant.{version}", rows=kept + extra)


def _optional_price(price: ModelPriceLike, component: str) -> Decimal | None:
    # A price that names only input and output (a v1 price) leaves the others to their defaults.
    value = getattr(price, component, None)
    return None if value is None else Decimal(value)


def _shadow_key(model: str) -> str:
    return normalise_model(model) if _is_family(model) else _exact_key(model)


@dataclass(frozen=True)
class StepPrice:
    """The cost of one step per usage component, and which price table produced it.

    ``input_cost_usd`` prices the uncached input and ``output_cost_usd`` the output other than
    reasoning; ``total_cost_usd`` is the sum of the five components.
    """

    pricing_status: PricingStatus
    input_cost_usd: Decimal | None
    output_cost_usd: Decimal | None
    total_cost_usd: Decimal | None
    price_table_version: str
    cached_input_cost_usd: Decimal | None = None
    cache_write_cost_usd: Decimal | None = None
    reasoning_cost_usd: Decimal | None = None


def _q(amount: Decimal) -> Decimal:
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def price_step(
    table: PriceTable,
    model: str | None,
    input_tokens: int,
    output_tokens: int,
    at: datetime,
    *,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> StepPrice:
    """The cost of a step that used ``model`` at ``at``, priced with the row in force at ``at``.

    The counts mean what ``libs.usage`` says: ``input_tokens`` includes the cached reads and the
    cache writes, ``output_tokens`` includes the reasoning, so each token is priced once, in one
    component.

    * no model (a tool step, for instance): ``no_model``, zero cost;
    * a model the table has no price for at ``at``: ``unpriced``, every amount ``None``;
    * otherwise ``priced``, each component rounded half-even to 1e-10 USD, the total their sum.

    Raises ``ValueError`` for counts that do not add up (see ``libs.usage.usage_problem``).
    """
    problem = usage_problem(
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens
    )
    if problem is not None:
        raise ValueError(problem)
    if model is None:
        zero = _q(Decimal(0))
        return StepPrice("no_model", zero, zero, zero, table.version, zero, zero, zero)
    row = table.lookup(model, at)
    if row is None:
        return StepPrice("unpriced", None, None, None, table.version)
    uncached = input_tokens - cached_input_tokens - cache_write_tokens
    parts = (
        _q(row.input_per_token * uncached),
        _q(row.cached_input * cached_input_tokens),
        _q(row.cache_write * cache_write_tokens),
        _q(row.output_per_token * (output_tokens - reasoning_tokens)),
        _q(row.reasoning * reasoning_tokens),
    )
    input_cost, cached_cost, write_cost, output_cost, reasoning_cost = parts
    return StepPrice(
        "priced",
        input_cost,
        output_cost,
        sum(parts, Decimal(0)),
        table.version,
        cached_cost,
        write_cost,
        reasoning_cost,
    )


class RecordedUsage(UsageCounts, Protocol):
    """What :func:`price_recorded` needs of a step (``run.step_recorded`` fits)."""

    @property
    def model(self) -> str | None: ...


def price_recorded(table: PriceTable, step: RecordedUsage, at: datetime) -> StepPrice:
    """:func:`price_step` of a recorded step's model and full usage."""
    return price_step(
        table,
        step.model,
        step.input_tokens,
        step.output_tokens,
        at,
        cached_input_tokens=step.cached_input_tokens,
        cache_write_tokens=step.cache_write_tokens,
        reasoning_tokens=step.reasoning_tokens,
    )


def estimate_cost(
    table: PriceTable,
    model: str | None,
    input_tokens: int,
    max_output_tokens: int,
    at: datetime,
) -> Decimal | None:
    """Upper-bound cost of a step before it runs (``None`` when the model has no price)."""
    return price_step(table, model, input_tokens, max_output_tokens, at).total_cost_usd


# A provider's own cost figure and ours may differ by rounding (providers round to cents or to
# 1e-6 USD) and by a price that changed; beyond the larger of these two, the difference is flagged.
MISMATCH_ABSOLUTE_USD = Decimal("0.000001")
MISMATCH_RELATIVE = Decimal("0.01")


def compare_provider_cost(
    computed: Decimal | None, provider: Decimal | None
) -> tuple[Decimal | None, bool]:
    """``(provider - computed, flagged)``: flagged when the difference exceeds the larger of
    :data:`MISMATCH_ABSOLUTE_USD` and :data:`MISMATCH_RELATIVE` of the computed cost.

    Without both figures there is nothing to compare: ``(None, False)``.
    """
    if computed is None or provider is None:
        return None, False
    difference = _q(provider - computed)
    tolerance = max(MISMATCH_ABSOLUTE_USD, abs(computed) * MISMATCH_RELATIVE)
    return difference, abs(difference) > tolerance


__all__ = [
    "BUILTIN_VERSION",
    "MISMATCH_ABSOLUTE_USD",
    "MISMATCH_RELATIVE",
    "PRICES_EVENT",
    "QUANTUM",
    "ModelPriceLike",
    "PriceRow",
    "PriceTable",
    "PricingStatus",
    "RecordedUsage",
    "StepPrice",
    "builtin_price_table",
    "compare_provider_cost",
    "estimate_cost",
    "normalise_model",
    "parse_effective_from",
    "price_recorded",
    "price_step",
    "with_overrides",
]
