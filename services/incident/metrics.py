"""The incident service's application metrics, read from its own table.

``incident.incidents`` is written in the same transaction as every incident append, so counting
its rows gives exact figures: what was committed, never what was tried and rolled back, the same
from every replica, and right again after a restart. A background task refreshes one snapshot
every :data:`REFRESH_S` seconds with a single aggregate query; the collector serves that snapshot
at scrape time, so a scrape never waits on the database.

Because every replica reports the same totals, aggregate them across replicas with ``max``, not
``sum``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from libs.errors import first_line
from libs.eventbus.db import transaction

log = structlog.get_logger("incident.metrics")

REFRESH_S = 5.0
SEVERITIES = ("low", "medium", "high", "critical")
# Seconds from opened to acknowledged / resolved: from an on-call reflex to a day.
BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


def _query() -> str:
    # One row per severity; each bucket is a FILTERed count, so one scan answers everything.
    def buckets(column: str) -> str:
        return ", ".join(
            f"count(*) FILTER (WHERE {column} IS NOT NULL AND "
            f"extract(epoch FROM {column} - opened_at) <= {b}) AS {column}_le_{i}"
            for i, b in enumerate(BUCKETS)
        )

    return (
        "SELECT severity, count(*) AS opened, "
        "count(*) FILTER (WHERE status = 'open') AS open_now, "
        "count(*) FILTER (WHERE status = 'acknowledged') AS acknowledged_now, "
        "count(acknowledged_at) AS acknowledged, count(resolved_at) AS resolved, "
        "coalesce(sum(extract(epoch FROM acknowledged_at - opened_at)), 0) AS ack_sum, "
        "coalesce(sum(extract(epoch FROM resolved_at - opened_at)), 0) AS resolve_sum, "
        f"{buckets('acknowledged_at')}, {buckets('resolved_at')} "
        "FROM incident.incidents GROUP BY severity"
    )


_QUERY = _query()


@dataclass(frozen=True)
class SeverityCounts:
    """What the table says about the incidents of one severity."""

    opened: int = 0
    open_now: int = 0
    acknowledged_now: int = 0
    acknowledged: int = 0
    resolved: int = 0
    ack_sum: float = 0.0
    resolve_sum: float = 0.0
    ack_buckets: tuple[int, ...] = ()
    resolve_buckets: tuple[int, ...] = ()


@dataclass(eq=False)  # the registry keeps collectors in a dict: identity, not value, equality
class IncidentMetrics(Collector):
    """Serves the latest snapshot of the incident table's counts as Prometheus metrics."""

    snapshot: dict[str, SeverityCounts] = field(default_factory=dict)
    refreshed: bool = False

    def register(self, registry: CollectorRegistry) -> IncidentMetrics:
        """Add the collector to ``registry``; returns itself."""
        registry.register(self)
        return self

    async def refresh(self, pool: AsyncConnectionPool) -> None:
        """Read the counts from the table into the snapshot."""
        async with transaction(pool) as conn:
            cur = await conn.execute(_QUERY)
            rows = await cur.fetchall()
        n = len(BUCKETS)
        snapshot: dict[str, SeverityCounts] = {}
        for row in rows:
            snapshot[str(row["severity"])] = SeverityCounts(
                opened=int(row["opened"]),
                open_now=int(row["open_now"]),
                acknowledged_now=int(row["acknowledged_now"]),
                acknowledged=int(row["acknowledged"]),
                resolved=int(row["resolved"]),
                ack_sum=float(row["ack_sum"]),
                resolve_sum=float(row["resolve_sum"]),
                ack_buckets=tuple(int(row[f"acknowledged_at_le_{i}"]) for i in range(n)),
                resolve_buckets=tuple(int(row[f"resolved_at_le_{i}"]) for i in range(n)),
            )
        self.snapshot = snapshot
        self.refreshed = True

    async def run(self, pool: AsyncConnectionPool, every: float = REFRESH_S) -> None:
        """Refresh every ``every`` seconds until cancelled; a failed refresh keeps the last one."""
        while True:
            try:
                await self.refresh(pool)
            except Exception as exc:
                log.warning("incident.metrics_refresh_failed", error=first_line(exc))
            await asyncio.sleep(every)

    def collect(self) -> Iterator[Metric]:
        """The metrics of the current snapshot (nothing before the first refresh)."""
        if not self.refreshed:
            return
        opened = CounterMetricFamily(
            "mc_incidents_opened", "Incidents opened, by severity.", labels=["severity"]
        )
        acked = CounterMetricFamily(
            "mc_incidents_acknowledged", "Incidents acknowledged, by severity.", labels=["severity"]
        )
        resolved = CounterMetricFamily(
            "mc_incidents_resolved", "Incidents resolved, by severity.", labels=["severity"]
        )
        current = GaugeMetricFamily(
            "mc_incidents_unresolved",
            "Incidents not yet resolved, by severity and status (open or acknowledged).",
            labels=["severity", "status"],
        )
        to_ack = HistogramMetricFamily(
            "mc_incident_time_to_acknowledge_seconds",
            "Seconds from an incident being opened to its acknowledgement.",
            labels=["severity"],
        )
        to_resolve = HistogramMetricFamily(
            "mc_incident_time_to_resolve_seconds",
            "Seconds from an incident being opened to its resolution.",
            labels=["severity"],
        )
        for severity in SEVERITIES:
            c = self.snapshot.get(severity, SeverityCounts())
            opened.add_metric([severity], c.opened)
            acked.add_metric([severity], c.acknowledged)
            resolved.add_metric([severity], c.resolved)
            current.add_metric([severity, "open"], c.open_now)
            current.add_metric([severity, "acknowledged"], c.acknowledged_now)
            to_ack.add_metric([severity], _buckets(c.ack_buckets, c.acknowledged), c.ack_sum)
            to_resolve.add_metric(
                [severity], _buckets(c.resolve_buckets, c.resolved), c.resolve_sum
            )
        yield from (opened, acked, resolved, current, to_ack, to_resolve)


def _buckets(counts: tuple[int, ...], total: int) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs ending in ``+Inf`` (all zero when ``counts`` is empty)."""
    values = counts or (0,) * len(BUCKETS)
    return [(str(b), float(v)) for b, v in zip(BUCKETS, values, strict=True)] + [
        ("+Inf", float(total))
    ]
