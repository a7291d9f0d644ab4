"""Durable pull consumers with explicit ack, bounded redelivery and a dead-letter path.

Idempotency is by construction: :class:`EventConsumer` records ``(consumer, event_id)`` in the
service's own ``applied_events`` table *in the same transaction* as the handler's effect, and acks
only after that commit. A crash after the commit and before the ack leads to a redelivery that
finds the record and is acked without running the effect again.

A message is dead-lettered (published to ``mc.dlq.<consumer>`` and terminated) when it cannot be
parsed, when its handler raises :class:`~libs.errors.PermanentError`, or when it fails on its last
allowed delivery. Messages behind it keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from libs.contracts.envelope import EventEnvelope
from libs.contracts.subjects import dlq_subject
from libs.errors import PermanentError
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.jetstream import ConsumerSpec, ensure_consumer
from libs.observability import bind_from_headers

log = structlog.get_logger("consumer")

Handler = Callable[[AsyncConn, EventEnvelope], Awaitable[None]]
TxBatchHandler = Callable[[AsyncConn, list[EventEnvelope]], Awaitable[None]]
BatchHandler = Callable[[list[EventEnvelope]], Awaitable[None]]


def applied_events_ddl(schema: str) -> str:
    """DDL of the applied-event record a service keeps in its own schema."""
    return (
        f"CREATE TABLE IF NOT EXISTS {schema}.applied_events ("
        " consumer text NOT NULL, event_id uuid NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (consumer, event_id))"
    )


@dataclass
class ConsumerStats:
    """What a consumer has done since it started."""

    applied: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_position: int = 0


class _Base:
    def __init__(self, js: JetStreamContext, spec: ConsumerSpec) -> None:
        self.js = js
        self.spec = spec
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        self.running = False

    def stop(self) -> None:
        """Return from ``run`` after the message in hand."""
        self._stop.set()

    async def run(self) -> None:
        """Fetch and handle messages until stopped."""
        await ensure_consumer(self.js, self.spec)
        sub = await self.js.pull_subscribe_bind(self.spec.durable, stream=self.spec.stream)
        self.running = True
        try:
            while not self._stop.is_set():
                try:
                    msgs = await sub.fetch(self.spec.fetch_batch, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    continue
                except Exception as exc:  # connection blips: the client reconnects by itself
                    log.warning(
                        "consumer.fetch_failed", consumer=self.spec.durable, error=repr(exc)
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.5)
                    continue
                try:
                    await self.handle_batch(msgs)
                except Exception as exc:
                    # A failed ack, nak or dead-letter publish (NATS restarting, say) must not
                    # end the consumer: whatever was not acked is redelivered after ack_wait.
                    log.warning(
                        "consumer.batch_failed", consumer=self.spec.durable, error=repr(exc)
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.5)
        finally:
            self.running = False
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def handle_batch(self, msgs: list[Msg]) -> None:
        for m in msgs:
            await self.handle(m)

    async def handle(self, msg: Msg) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def parse(msg: Msg) -> EventEnvelope:
        try:
            return EventEnvelope.model_validate_json(msg.data)
        except ValidationError as exc:
            raise PermanentError(f"malformed event: {exc.errors()[0]['msg']}") from exc

    async def parse_batch(self, msgs: list[Msg]) -> list[tuple[Msg, EventEnvelope]]:
        """Each message with its envelope; the unparseable ones go to the dead-letter path."""
        parsed: list[tuple[Msg, EventEnvelope]] = []
        for m in msgs:
            try:
                parsed.append((m, self.parse(m)))
            except PermanentError as exc:
                await self.fail(m, exc)
        return parsed

    async def fail(self, msg: Msg, exc: BaseException) -> None:
        """Retry later, or dead-letter when retrying cannot help or attempts are used up."""
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if isinstance(exc, PermanentError) or delivered >= self.spec.max_deliver:
            await self.dead_letter(msg, exc, delivered)
            return
        self.stats.retried += 1
        log.warning(
            "consumer.retry",
            consumer=self.spec.durable,
            delivery=delivered,
            error=repr(exc),
        )
        await msg.nak(delay=self.spec.delay_for(delivered))

    async def dead_letter(self, msg: Msg, exc: BaseException, delivered: int) -> None:
        headers = dict(msg.headers or {})
        seq = msg.metadata.sequence.stream if msg.metadata else 0
        headers.update(
            {
                "Mc-Dlq-Consumer": self.spec.durable,
                "Mc-Dlq-Reason": repr(exc)[:1000],
                "Mc-Dlq-Deliveries": str(delivered),
                "Mc-Dlq-Subject": msg.subject,
                "Nats-Msg-Id": f"{self.spec.durable}:{seq}",
            }
        )
        await self.js.publish(dlq_subject(self.spec.durable), msg.data, headers=headers)
        await msg.term()
        self.stats.dead_lettered += 1
        log.error("consumer.dead_lettered", consumer=self.spec.durable, reason=repr(exc))


class EventConsumer(_Base):
    """Runs ``handler(conn, envelope)`` once per event, inside a PostgreSQL transaction.

    With a ``batch_handler``, a whole fetched batch is applied in one transaction instead:
    one statement records every event id not applied yet, and ``batch_handler(conn, fresh)``
    gets only those. One commit (one fsync) and a handful of round trips per batch instead of
    per event is what lets a high-volume consumer keep up. If anything in the batch fails, the
    transaction is rolled back and every message is handled alone by ``handler``, so the failure
    is retried or dead-lettered by itself. Only for handlers whose in-memory state never runs
    ahead of what they committed (a rolled-back batch must leave nothing behind).
    """

    def __init__(
        self,
        js: JetStreamContext,
        pool: AsyncConnectionPool,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        applied_table: str,
        batch_handler: TxBatchHandler | None = None,
    ) -> None:
        super().__init__(js, spec)
        self.pool = pool
        self.handler = handler
        self.applied_table = applied_table
        self.batch_handler = batch_handler

    async def handle_batch(self, msgs: list[Msg]) -> None:
        if self.batch_handler is None or len(msgs) < 2:
            await super().handle_batch(msgs)
            return
        parsed = await self.parse_batch(msgs)
        if not parsed:
            return
        try:
            async with transaction(self.pool) as conn:
                cur = await conn.execute(
                    f"INSERT INTO {self.applied_table} (consumer, event_id) "
                    "SELECT %s, unnest(%s::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id",
                    (self.spec.durable, [env.event_id for _, env in parsed]),
                )
                new_ids = {row["event_id"] for row in await cur.fetchall()}
                fresh: list[EventEnvelope] = []
                for _, env in parsed:
                    if env.event_id in new_ids:
                        fresh.append(env)
                        new_ids.discard(env.event_id)  # a redelivery inside the same batch
                if fresh:
                    await self.batch_handler(conn, fresh)
        except Exception:
            for m, _ in parsed:
                await self.handle(m)
            return
        applied = {env.event_id for env in fresh}
        for m, env in parsed:
            self._count(env, env.event_id in applied)
            applied.discard(env.event_id)
            await self.ack(m)

    def _count(self, env: EventEnvelope, applied: bool) -> None:
        if applied:
            self.stats.applied += 1
        else:
            self.stats.duplicates += 1
        self.stats.last_position = max(self.stats.last_position, env.position or 0)

    async def handle(self, msg: Msg) -> None:
        bind_from_headers(msg.headers)
        try:
            env = self.parse(msg)
            applied = await self.apply(env)
        except Exception as exc:
            await self.fail(msg, exc)
            return
        self._count(env, applied)
        await self.ack(msg)

    async def apply(self, env: EventEnvelope) -> bool:
        """Apply the effect unless already applied; return whether it ran."""
        async with transaction(self.pool) as conn:
            return await self._apply_in(conn, env)

    async def _apply_in(self, conn: AsyncConn, env: EventEnvelope) -> bool:
        cur = await conn.execute(
            f"INSERT INTO {self.applied_table} (consumer, event_id) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING",
            (self.spec.durable, env.event_id),
        )
        if cur.rowcount == 0:
            return False
        await self.handler(conn, env)
        return True

    async def ack(self, msg: Msg) -> None:
        """Acknowledge after the effect committed (a separate step so a crash can fall between)."""
        await msg.ack()


class BatchEventConsumer(_Base):
    """Hands a whole fetched batch to ``handler`` (for sinks that are idempotent by key).

    If the batch fails, each message is retried alone so one poison message cannot hold back
    the rest.
    """

    def __init__(self, js: JetStreamContext, spec: ConsumerSpec, handler: BatchHandler) -> None:
        super().__init__(js, spec)
        self.handler = handler

    async def handle_batch(self, msgs: list[Msg]) -> None:
        parsed = await self.parse_batch(msgs)
        if not parsed:
            return
        try:
            await self.handler([e for _, e in parsed])
        except Exception:
            for m, e in parsed:
                await self.handle_one(m, e)
            return
        for m, e in parsed:
            self.stats.applied += 1
            self.stats.last_position = max(self.stats.last_position, e.position or 0)
            await m.ack()

    async def handle_one(self, msg: Msg, env: EventEnvelope) -> None:
        try:
            await self.handler([env])
        except Exception as exc:
            await self.fail(msg, exc)
            return
        self.stats.applied += 1
        self.stats.last_position = max(self.stats.last_position, env.position or 0)
        await msg.ack()

    async def handle(self, msg: Msg) -> None:
        await self.handle_batch([msg])
