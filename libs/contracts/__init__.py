"""Versioned event contracts: the envelope, the typed events and their registry."""

from libs.contracts import events as events
from libs.contracts.envelope import (
    DomainEvent,
    EventEnvelope,
    TraceContext,
    new_uuid7,
    stream_id_for,
    utcnow,
)
from libs.contracts.registry import decode, register, upcaster

__all__ = [
    "DomainEvent",
    "EventEnvelope",
    "TraceContext",
    "decode",
    "envelope_for",
    "events",
    "new_uuid7",
    "register",
    "stream_id_for",
    "upcaster",
    "utcnow",
]


def envelope_for(
    event: DomainEvent,
    *,
    tenant_id: str,
    stream_id: str,
    correlation_id: str,
    actor: str,
    causation_id: str | None = None,
    trace_context: TraceContext | None = None,
) -> EventEnvelope:
    """Wrap a typed event in a fresh envelope, ready to append."""
    return EventEnvelope(
        event_type=event.event_type,
        schema_version=event.schema_version,
        tenant_id=tenant_id,
        stream_id=stream_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        actor=actor,
        trace_context=trace_context or TraceContext(),
        payload=event.model_dump(mode="json"),
    )
