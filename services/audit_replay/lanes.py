"""The two lanes events take into the projections: control and bulk.

A violation, a stop or an incident must be queryable within a second (an admission decision
within about two), even right behind a burst of tens of thousands of recorded steps. One
consumer over every event would make it wait until the burst ahead of it is projected, so the
projector reads the log through two durable JetStream consumers, each with its own buffer and
flush:

* **bulk**: ``run.step_recorded`` and ``cost.recorded``, the high-volume events. Large fetches,
  large inserts, flushed every second or 20,000 rows.
* **control**: every other event type (runs starting and ending, stops, violations, decisions,
  incidents, policies, prices, tenants). Small fetches, flushed every 50 ms, except that a buffer
  holding only admission decisions waits up to a second: every step asks admission first, so
  decisions are as frequent as steps, and a chDB insert costs milliseconds of CPU whatever its
  size (flushing decisions every 50 ms cost about 6 ms of CPU per decision, one at a time).

Every event type this build knows is in exactly one lane (a unit test keeps it so); a new event
type joins the control lane unless it is added to :data:`BULK_EVENTS`, and JetStream brings the
lane's durable consumer to the new subjects at start, keeping its position.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.contracts.registry import all_models
from libs.contracts.subjects import events_filter
from libs.eventbus.jetstream import ConsumerSpec

BULK_EVENTS = frozenset({"run.step_recorded", "cost.recorded"})


def control_events() -> frozenset[str]:
    """Every registered event type that is not bulk."""
    return frozenset(m.event_type for m in all_models()) - BULK_EVENTS


@dataclass(frozen=True)
class Lane:
    """One consumer of the projector, with its batch sizes and flush cadence."""

    name: str
    durable: str
    event_types: frozenset[str]
    fetch_batch: int
    max_ack_pending: int
    flush_rows: int
    flush_interval: float
    relaxed_events: frozenset[str] = frozenset()
    """Event types that alone do not need the short interval: a buffer of only these is written
    every ``relaxed_interval`` seconds instead."""
    relaxed_interval: float = 1.0

    def spec(self) -> ConsumerSpec:
        """The durable JetStream consumer of this lane."""
        return ConsumerSpec(
            durable=self.durable,
            filter_subjects=tuple(events_filter(t) for t in sorted(self.event_types)),
            fetch_batch=self.fetch_batch,
            max_ack_pending=self.max_ack_pending,
            # A ClickHouse outage must not dead-letter events: keep redelivering for a long time.
            max_deliver=200,
            backoff=(0.2, 1.0, 2.0, 5.0),
        )


CONTROL = Lane(
    name="control",
    durable="audit-control",
    event_types=control_events(),
    fetch_batch=200,
    max_ack_pending=5_000,
    flush_rows=2_000,
    flush_interval=0.05,
    relaxed_events=frozenset({"admission.decided"}),
    relaxed_interval=1.0,
)
BULK = Lane(
    name="bulk",
    durable="audit-bulk",
    event_types=BULK_EVENTS,
    fetch_batch=1_000,
    max_ack_pending=40_000,
    flush_rows=20_000,
    # ClickHouse's advice is about one insert per second per table; with chDB every insert
    # costs tens of milliseconds of CPU whatever its size, so small frequent ones add up.
    flush_interval=1.0,
)
LANES: tuple[Lane, ...] = (CONTROL, BULK)
LEGACY_DURABLE = "audit-projector"
"""The single consumer of earlier versions, removed at start (its lanes replay from the start)."""


def lane_of(event_type: str) -> Lane:
    """The lane an event of ``event_type`` travels in (control for types this build lacks)."""
    return BULK if event_type in BULK_EVENTS else CONTROL
