"""Test helpers around the bus: reading back what JetStream holds, scratch schemas."""

from __future__ import annotations

import uuid

import psycopg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs.contracts.envelope import EventEnvelope
from libs.contracts.subjects import EVENTS_STREAM, events_filter
from libs.eventbus.consumer import applied_events_ddl


async def tenant_reader(js: JetStreamContext, tenant: str) -> JetStreamContext.PullSubscription:
    """An ephemeral pull consumer over every event JetStream holds for ``tenant``."""
    return await js.pull_subscribe(
        events_filter(">", tenant),
        durable=None,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60,
            name=f"read-{uuid.uuid4().hex[:8]}",
        ),
    )


async def read_stream_messages(
    js: JetStreamContext, tenant: str, expected: int, timeout: float = 30.0
) -> list[EventEnvelope]:
    """Every message JetStream holds for ``tenant``, in stream order (ephemeral consumer)."""
    import time

    sub = await tenant_reader(js, tenant)
    out: list[EventEnvelope] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(500, timeout=0.5)
            except Exception:
                msgs = []
            out.extend(EventEnvelope.model_validate_json(m.data) for m in msgs)
            if not msgs and len(out) >= expected:
                break
    finally:
        await sub.unsubscribe()
    return out


def scratch_schema(admin_url: str, name: str) -> str:
    """A schema with applied_events and an effects table the service role may write."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        conn.execute(applied_events_ddl(name))  # type: ignore[arg-type]
        conn.execute(
            f"CREATE TABLE {name}.effects"
            " (event_id uuid NOT NULL, applied_at timestamptz DEFAULT now())"
        )
        conn.execute(f"GRANT USAGE ON SCHEMA {name} TO mc_service")
        conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {name} TO mc_service")
    return name
