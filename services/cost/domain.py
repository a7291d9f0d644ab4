"""The cost domain: pure decisions, no I/O.

* :func:`decide_cost` prices one recorded step with the tenant's price table.
* :func:`parse_prices` and :func:`decide_publish` turn a ``set_prices`` request into the next
  ``cost.price_table_published`` event.
* :func:`price_listing` describes a tenant's current table for the ``prices`` request.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from libs.contracts.events import ComponentPrice, CostRecorded, PriceTablePublished, StepRecorded
from libs.errors import InvalidInput
from libs.pricing import (
    PriceTable,
    builtin_price_table,
    compare_provider_cost,
    parse_effective_from,
    price_recorded,
    with_overrides,
)

# Fixed forever: changing it would give already-costed steps a second, different cost id.
COST_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mission-control:cost.recorded")
MAX_PRICES = 1000
MAX_MODEL_LEN = 200


def cost_id_for(step_event_id: uuid.UUID) -> str:
    """The cost id of a step event: the same event always yields the same id."""
    return str(uuid.uuid5(COST_NAMESPACE, str(step_event_id)))


def decide_cost(
    step: StepRecorded, occurred_at: datetime, table: PriceTable, *, step_event_id: uuid.UUID
) -> CostRecorded:
    """The ``cost.recorded`` event of one step, priced at the time the step occurred.

    Pricing at ``occurred_at`` (not at processing time) makes the result independent of consumer
    lag and lets a replay with the same table reproduce it exactly. A provider-reported cost on
    the step is kept beside the computed one and compared with it.
    """
    price = price_recorded(table, step, occurred_at)
    difference, mismatch = compare_provider_cost(price.total_cost_usd, step.provider_cost_usd)
    return CostRecorded(
        cost_id=cost_id_for(step_event_id),
        run_id=step.run_id,
        agent_id=step.agent_id,
        step_index=step.step_index,
        model=step.model,
        input_tokens=step.input_tokens,
        output_tokens=step.output_tokens,
        cached_input_tokens=step.cached_input_tokens,
        cache_write_tokens=step.cache_write_tokens,
        reasoning_tokens=step.reasoning_tokens,
        pricing_status=price.pricing_status,
        input_cost_usd=price.input_cost_usd,
        cached_input_cost_usd=price.cached_input_cost_usd,
        cache_write_cost_usd=price.cache_write_cost_usd,
        output_cost_usd=price.output_cost_usd,
        reasoning_cost_usd=price.reasoning_cost_usd,
        total_cost_usd=price.total_cost_usd,
        price_table_version=price.price_table_version,
        provider_cost_usd=step.provider_cost_usd,
        cost_difference_usd=difference,
        cost_mismatch=mismatch,
    )


def _amount(item: int, field: str, value: Any) -> Decimal:
    # bool is an int in Python; a price of ``true`` is a client bug, not 1 USD per token.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"prices[{item}].{field} must be a number or a decimal string")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"prices[{item}].{field} must be finite")
    try:
        # Through str so a JSON float like 2.5e-06 becomes exactly 0.0000025.
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidInput(f"prices[{item}].{field} is not a number: {value!r}") from None
    if not amount.is_finite():
        raise InvalidInput(f"prices[{item}].{field} must be finite")
    if amount < 0:
        raise InvalidInput(f"prices[{item}].{field} must not be negative")
    return amount


# The components a price may leave out, and the price each then takes: a provider without a
# cache discount charges cache reads and writes as input, and reasoning is billed as output.
OPTIONAL_COMPONENTS = {
    "cached_input_per_token": "input_per_token",
    "cache_write_per_token": "input_per_token",
    "reasoning_per_token": "output_per_token",
}


def parse_prices(raw: Any) -> list[ComponentPrice]:
    """Validate the ``prices`` of a ``set_prices`` request.

    Each item needs a non-empty ``model``, non-negative ``input_per_token`` and
    ``output_per_token`` (USD per token) and optionally an ISO 8601 ``effective_from`` (naive means
    UTC; default the epoch). ``cached_input_per_token``, ``cache_write_per_token`` and
    ``reasoning_per_token`` are optional (see :data:`OPTIONAL_COMPONENTS` for their defaults); the
    published price names all five. An empty list is valid: it returns the tenant to the
    built-in prices.
    """
    if not isinstance(raw, list):
        raise InvalidInput("prices must be a list of {model, input_per_token, output_per_token}")
    if len(raw) > MAX_PRICES:
        raise InvalidInput(f"at most {MAX_PRICES} prices per request")
    out: list[ComponentPrice] = []
    seen: set[tuple[str, datetime]] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidInput(f"prices[{i}] must be an object")
        unknown = set(item) - {
            "model", "input_per_token", "output_per_token", "effective_from", *OPTIONAL_COMPONENTS
        }  # fmt: skip
        if unknown:
            raise InvalidInput(f"prices[{i}] has unknown fields: {sorted(unknown)}")
        model = item.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidInput(f"prices[{i}].model must be a non-empty string")
        model = model.strip()
        if len(model) > MAX_MODEL_LEN:
            raise InvalidInput(f"prices[{i}].model is longer than {MAX_MODEL_LEN} characters")
        for field in ("input_per_token", "output_per_token"):
            if field not in item:
                raise InvalidInput(f"prices[{i}].{field} is required")
        raw_from = item.get("effective_from", "1970-01-01T00:00:00+00:00")
        if not isinstance(raw_from, str):
            raise InvalidInput(f"prices[{i}].effective_from must be an ISO 8601 string")
        try:
            effective = parse_effective_from(raw_from).astimezone(UTC)
        except ValueError:
            raise InvalidInput(
                f"prices[{i}].effective_from is not an ISO 8601 timestamp: {raw_from!r}"
            ) from None
        if (model, effective) in seen:
            raise InvalidInput(f"prices[{i}]: {model} is priced twice from {effective.isoformat()}")
        seen.add((model, effective))
        amounts = {
            field: _amount(i, field, item[field])
            for field in ("input_per_token", "output_per_token")
        }
        for field, default in OPTIONAL_COMPONENTS.items():
            given = item.get(field)
            amounts[field] = amounts[default] if given is None else _amount(i, field, given)
        out.append(ComponentPrice(model=model, effective_from=effective.isoformat(), **amounts))
    return out


def decide_publish(current_version: int, prices: list[ComponentPrice]) -> PriceTablePublished:
    """The event that makes ``prices`` the tenant's complete override list, one version later."""
    return PriceTablePublished(version=current_version + 1, prices=prices)


def price_listing(latest: PriceTablePublished | None) -> dict[str, Any]:
    """The ``prices`` result: table version and every row, marked ``builtin`` or ``override``.

    Amounts are decimal strings so no precision is lost in JSON.
    """
    base = builtin_price_table()
    overrides = latest.prices if latest is not None else []
    version = latest.version if latest is not None else 0
    table = with_overrides(base, overrides, version) if latest is not None else base
    first_override = len(table.rows) - len(overrides)
    rows: list[dict[str, Any]] = []
    for index, row in enumerate(table.rows):
        rows.append(
            {
                "model": row.model,
                "input_per_token": format(row.input_per_token, "f"),
                "cached_input_per_token": format(row.cached_input, "f"),
                "cache_write_per_token": format(row.cache_write, "f"),
                "output_per_token": format(row.output_per_token, "f"),
                "reasoning_per_token": format(row.reasoning, "f"),
                "effective_from": row.effective_from.isoformat(),
                # Overrides come last in the table; base rows they shadow are already gone.
                "source": "override" if index >= first_override else "builtin",
            }
        )
    return {"version": version, "price_table_version": table.version, "prices": rows}
