"""A tenant's price table as its ``<tenant>/prices/table`` stream tells it (cost and admission).

Every ``cost.price_table_published`` event carries the tenant's complete override list, so the
newest one replaces the table whole. Pure apart from building the aggregate description.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libs.contracts.events import PriceTablePublished
from libs.eventbus.repository import Aggregate, Recorded
from libs.pricing import PriceTable, builtin_price_table, with_overrides

PRICES_CATEGORY = "prices"
PRICE_TABLE_ID = "table"


@dataclass(frozen=True)
class TenantPrices:
    """The built-in table with the tenant's latest published overrides applied."""

    table: PriceTable
    published: PriceTablePublished | None = None

    @property
    def version(self) -> int:
        """The published price-table version (0: built-in prices only)."""
        return self.published.version if self.published is not None else 0


def builtin_prices(tenant_id: str = "", entity_id: str = PRICE_TABLE_ID) -> TenantPrices:
    """A tenant that never published prices."""
    return TenantPrices(builtin_price_table())


def fold_prices(state: TenantPrices, recorded: Sequence[Recorded]) -> TenantPrices:
    """``state`` after the newest of ``recorded``'s published tables (older ones change nothing)."""
    latest = state.published
    for r in recorded:
        if isinstance(r.event, PriceTablePublished) and (
            latest is None or r.event.version >= latest.version
        ):
            latest = r.event
    if latest is None or latest is state.published:
        return state
    return TenantPrices(
        with_overrides(builtin_price_table(), latest.prices, latest.version), latest
    )


PRICES = Aggregate[TenantPrices](category=PRICES_CATEGORY, initial=builtin_prices, fold=fold_prices)
"""The price-table aggregate; its entity id is always :data:`PRICE_TABLE_ID`."""
