"""The transactional-outbox relay: ``eventstore.events`` → JetStream, in store order.

Why it cannot lose or skip an event:

* It follows the log's total order ``(log_xid, position)`` and reads only events below the
  visibility horizon ``pg_snapshot_xmin(pg_current_snapshot())`` (see ``store.py``): every event
  there is already visible and none can appear there later, so the cursor never passes a gap,
  and it never publishes an event of a transaction that is still open.
* The checkpoint moves only after JetStream acked every publish up to it. A crash in between
  republishes the tail; ``Nats-Msg-Id`` = event id lets JetStream drop those within its duplicate
  window, and consumers' applied-event records absorb anything older.
* One relay is active at a time: it holds a session-level advisory lock, so a second replica
  (or a restarted one while the old connection lingers) waits as a hot standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import structlog
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from psycopg.rows import dict_row

from libs.contracts.subjects import event_subject
from libs.errors import TransientError
from libs.eventbus.db import NOTIFY_CHANNEL, translate
from libs.eventbus.store import HORIZON, START, LogCursor

if TYPE_CHECKING:
    from libs.eventbus.anchor import Anchorer

RELAY_LOCK = 7_231_002
# JetStream takes at most 1,000 messages in one atomic batch; the byte cap keeps a batch of large
# events well inside what the server stages in memory.
ATOMIC_BATCH_MAX = 500
ATOMIC_BATCH_BYTES = 8 * 1024 * 1024
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
log = structlog.get_logger("relay")

# The message body is the envelope as JSON, rendered by PostgreSQL: the payload is never decoded
# and re-encoded in Python. Its keys are the envelope's fields; consumers parse it as one.
_SELECT = (
    "SELECT position, event_id, event_type, schema_version, tenant_id, correlation_id, "
    "trace_context, log_xid::text AS log_xid_text, json_build_object('position', position, "
    "'event_id', event_id, 'event_type', event_type, 'schema_version', schema_version, "
    "'tenant_id', tenant_id, 'stream_id', stream_id, 'stream_version', stream_version, "
    "'occurred_at', occurred_at, 'recorded_at', recorded_at, 'correlation_id', correlation_id, "
    "'causation_id', causation_id, 'actor', actor, 'trace_context', trace_context, "
    "'payload', payload)::text AS body FROM eventstore.events "
    f"WHERE (log_xid, position) > (%s::text::xid8, %s) AND log_xid < {HORIZON} "
    "ORDER BY log_xid, position LIMIT %s"
)


def message_for(row: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Subject, body and headers of the JetStream message for one stored event.

    ``row`` carries the header fields and ``body``, the envelope as JSON (see ``_SELECT``).
    """
    headers = {
        "Nats-Msg-Id": str(row["event_id"]),
        "Mc-Event-Type": row["event_type"],
        "Mc-Schema-Version": str(row["schema_version"]),
        "Mc-Tenant": row["tenant_id"],
        "Mc-Correlation-Id": row["correlation_id"],
        "Mc-Position": str(row["position"]),
    }
    tc = row.get("trace_context") or {}
    for key in ("traceparent", "tracestate"):
        if tc.get(key):
            headers[key] = tc[key]
    return event_subject(row["tenant_id"], row["event_type"]), row["body"].encode(), headers


@dataclass
class RelayStats:
    """Counters exposed for metrics and benchmarks."""

    published: int = 0
    checkpoint: LogCursor = START
    batches: int = 0
    held_back_seconds: float = 0.0
    """How long committed events have waited behind one open transaction (0 when none do)."""


class Relay:
    """Publishes committed events to JetStream and checkpoints the position."""

    def __init__(
        self,
        database_url: str,
        js: JetStreamContext,
        *,
        name: str = "default",
        batch_size: int = 500,
        in_flight: int = 256,
        idle_wait: float = 1.0,
        atomic: bool = True,
        held_warning: float = 30.0,
    ) -> None:
        self.database_url = database_url
        self.js = js
        self.name = name
        self.batch_size = batch_size
        self.in_flight = in_flight
        self.idle_wait = idle_wait
        self.stats = RelayStats()
        # Atomic batches until the server shows it does not do them.
        self.atomic = atomic
        self.held_warning = held_warning
        # (xid at the horizon, when committed events were first seen waiting behind it, warned)
        self._held: tuple[str, float, bool] | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to return after the current batch."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until stopped, reconnecting to PostgreSQL after transient failures."""
        while not self._stop.is_set():
            try:
                await self._run_leader()
            except (psycopg.Error, OSError, TransientError) as exc:
                log.warning(
                    "relay.retry",
                    error=str(translate(exc) if isinstance(exc, psycopg.Error) else exc),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    async def _run_leader(self) -> None:
        listen = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        work = await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, row_factory=dict_row
        )
        try:
            while not self._stop.is_set():
                cur = await listen.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK,))
                got = await cur.fetchone()
                if got and got[0]:
                    break
                # Another relay is active; stay a standby.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
            await listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
            await work.execute(
                "INSERT INTO eventstore.relay_checkpoints (name, position) VALUES (%s, 0) "
                "ON CONFLICT (name) DO NOTHING",
                (self.name,),
            )
            notifies = listen.notifies(timeout=self.idle_wait)
            while not self._stop.is_set():
                if await self.relay_once(work):
                    continue
                # Nothing pending: sleep until an append commits (NOTIFY) or the idle timeout,
                # which also covers a NOTIFY lost while we were busy.
                with contextlib.suppress(StopAsyncIteration):
                    await anext(notifies)
                notifies = listen.notifies(timeout=self.idle_wait)
        finally:
            await work.close()
            await listen.close()

    async def relay_once(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> int:
        """Publish the next batch after the checkpoint; return how many were published."""
        cur = await conn.execute(
            "SELECT log_xid::text AS log_xid, position FROM eventstore.relay_checkpoints "
            "WHERE name = %s",
            (self.name,),
        )
        row = await cur.fetchone()
        checkpoint = LogCursor(int(row["log_xid"]), int(row["position"])) if row else LogCursor()
        cur = await conn.execute(
            _SELECT, (str(checkpoint.log_xid), checkpoint.position, self.batch_size)
        )
        rows = await cur.fetchall()
        if not rows:
            self.stats.checkpoint = checkpoint
            await self._watch_horizon(conn, checkpoint)
            return 0
        self._held = None
        self.stats.held_back_seconds = 0.0
        last = LogCursor(int(rows[-1]["log_xid_text"]), int(rows[-1]["position"]))
        await self.publish_in_order(rows)
        await conn.execute(
            "UPDATE eventstore.relay_checkpoints SET log_xid = %s::text::xid8, position = %s, "
            "updated_at = now() WHERE name = %s AND (log_xid, position) < (%s::text::xid8, %s)",
            (str(last.log_xid), last.position, self.name, str(last.log_xid), last.position),
        )
        self.stats.published += len(rows)
        self.stats.checkpoint = last
        self.stats.batches += 1
        return len(rows)

    async def _watch_horizon(
        self, conn: psycopg.AsyncConnection[dict[str, Any]], checkpoint: LogCursor
    ) -> None:
        """Warn when committed events wait behind a transaction that stays open.

        The relay reads only below the oldest open transaction's id (that is what keeps it
        gap-free), so one transaction that wrote something and was left open (a session idle in
        transaction, say) holds back every event committed after it began. Said once per such
        transaction, after ``held_warning`` seconds, naming its xid for ``pg_stat_activity``.
        """
        cur = await conn.execute(
            f"SELECT {HORIZON}::text AS xmin, EXISTS (SELECT 1 FROM eventstore.events "
            f"WHERE log_xid >= {HORIZON} AND (log_xid, position) > (%s::text::xid8, %s)) "
            "AS waiting",
            (str(checkpoint.log_xid), checkpoint.position),
        )
        row = await cur.fetchone()
        if row is None or not row["waiting"]:
            self._held = None
            self.stats.held_back_seconds = 0.0
            return
        now = time.monotonic()
        if self._held is None or self._held[0] != row["xmin"]:
            self._held = (row["xmin"], now, False)
        xid, since, warned = self._held
        self.stats.held_back_seconds = now - since
        if not warned and now - since >= self.held_warning:
            log.warning(
                "relay.held_back_by_open_transaction",
                xid=xid,
                seconds=round(now - since, 1),
                hint="committed events wait until the transaction with this backend_xid "
                "(pg_stat_activity) ends; consider idle_in_transaction_session_timeout",
            )
            self._held = (xid, since, True)

    async def publish_in_order(self, rows: list[dict[str, Any]]) -> None:
        """Publish ``rows`` in log order; raise if they could not all be published.

        On a stream that allows atomic batches (nats-server 2.12+, ``allow_atomic``) the rows go
        as atomic batches, one at a time: each batch is stored whole or not at all, in order,
        with one acknowledgement and one fsync, so a lost message can never let a later one be
        stored ahead of it. Otherwise they are pipelined one message per event (see
        :meth:`publish_pipelined`). After any failure the rows are published again one at a
        time: what JetStream already holds is dropped by ``Nats-Msg-Id``, the rest is stored in
        order. (A republished batch that holds an event JetStream already has is refused whole,
        so the first batch after a crash always takes that path.)
        """
        try:
            if self.atomic:
                for batch in self._atomic_batches(rows):
                    await self.publish_atomic(batch)
            else:
                await self.publish_pipelined(rows)
        except Exception as exc:
            if isinstance(exc, MaxPayloadError):
                # Only a server whose max_payload is below the store's event limit does this;
                # it needs an operator, and every event behind it waits.
                log.error(
                    "relay.event_over_max_payload",
                    hint="raise the NATS server's max_payload above "
                    "libs.eventbus.store.MAX_EVENT_BYTES",
                )
            log.warning("relay.republishing_one_by_one", error=repr(exc))
            for row in rows:
                try:
                    await self._publish(row, after=None)
                except Exception as again:
                    raise TransientError(f"publish failed: {again!r}") from again

    def _atomic_batches(
        self, rows: list[dict[str, Any]]
    ) -> Iterator[list[tuple[str, bytes, dict[str, str]]]]:
        batch: list[tuple[str, bytes, dict[str, str]]] = []
        size = 0
        for row in rows:
            msg = message_for(row)
            if batch and (
                len(batch) >= ATOMIC_BATCH_MAX or size + len(msg[1]) > ATOMIC_BATCH_BYTES
            ):
                yield batch
                batch, size = [], 0
            batch.append(msg)
            size += len(msg[1])
        if batch:
            yield batch

    async def publish_atomic(self, batch: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """Publish one atomic batch and wait for its commit acknowledgement."""
        batch_id = uuid.uuid4().hex
        last = len(batch) - 1
        for i, (subject, body, headers) in enumerate(batch):
            headers[BATCH_ID] = batch_id
            headers[BATCH_SEQUENCE] = str(i + 1)
            if i < last:
                await self._send(subject, body, headers)
        subject, body, headers = batch[last]
        headers[BATCH_COMMIT] = "1"
        reply = await self.js._nc.request(subject, body, headers=headers, timeout=10)
        ack = orjson.loads(reply.data) if reply.data else {}
        if "error" in ack:
            raise TransientError(f"atomic batch refused: {ack['error'].get('description')}")
        if ack.get("batch") != batch_id or ack.get("count") != len(batch):
            # A server without atomic batches stores each message as it comes and acks only
            # the last: whether the others arrived is unknown, so this batch is published again
            # one by one, and from now on the relay pipelines single messages.
            self.atomic = False
            raise TransientError("the server does not acknowledge atomic batches")

    async def _send(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        # A message of an atomic batch before its commit: a plain core publish, no ack of its own.
        await self.js._nc.publish(subject, body, headers=headers)

    async def publish_pipelined(self, rows: list[dict[str, Any]]) -> None:
        """Publish one message per row with up to ``in_flight`` acknowledgements outstanding.

        Awaiting each ack would cost one fsync and one round trip per event. The publishes are
        chained: each carries ``Nats-Expected-Last-Msg-Id`` = the previous event's id, so if one
        is lost (a connection dropped mid-window, say), JetStream refuses every later one instead
        of storing it ahead of the lost one. (The chain assumes the relay is the only publisher
        on the events stream; a foreign message only costs a one-by-one pass.)
        """
        for start in range(0, len(rows), self.in_flight):
            window = rows[start : start + self.in_flight]
            prev = rows[start - 1] if start else None
            results = await asyncio.gather(
                *(
                    self._publish(r, after=(window[i - 1] if i else prev))
                    for i, r in enumerate(window)
                ),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]

    async def _publish(self, row: dict[str, Any], *, after: dict[str, Any] | None) -> None:
        subject, body, headers = message_for(row)
        if after is not None:
            headers["Nats-Expected-Last-Msg-Id"] = str(after["event_id"])
        await self.js.publish(subject, body, headers=headers, timeout=10)


async def _main() -> None:
    from libs.eventbus.anchor import Anchorer, load_signing_key
    from libs.eventbus.db import open_pool
    from libs.eventbus.jetstream import connect, ensure_streams
    from libs.eventbus.store import EventStore
    from libs.observability import configure_logging
    from libs.settings import get_settings

    settings = get_settings()
    configure_logging("relay", settings.log_level)
    nc = await connect(settings.nats_url, "relay", settings.nats_credentials())
    js = nc.jetstream()
    await ensure_streams(js)
    database_url = settings.database_url.get_secret_value()
    relay = Relay(database_url, js)
    # The relay's host also writes the event store's signed checkpoints (one writer: the anchor
    # lock), when it has a signing key.
    anchorer: Anchorer | None = None
    pool = None
    if settings.anchor_signing_key is not None:
        key = load_signing_key(settings.anchor_signing_key)
        pool = await open_pool(database_url, min_size=1, max_size=1)
        anchorer = Anchorer(database_url, EventStore(pool), key, settings.anchor_interval_s)
    else:
        log.warning("relay.no_anchor_key", hint="set MC_ANCHOR_SIGNING_KEY to sign checkpoints")
    loop = asyncio.get_running_loop()
    stop = relay.stop if anchorer is None else _stop_both(relay, anchorer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    log.info("relay.started", nats=settings.nats_url)
    try:
        if anchorer is None:
            await relay.run()
        else:
            await asyncio.gather(relay.run(), anchorer.run())
    finally:
        if pool is not None:
            await pool.close()
        await nc.drain()


def _stop_both(relay: Relay, anchorer: Anchorer) -> Callable[[], None]:
    def stop() -> None:
        relay.stop()
        anchorer.stop()

    return stop


def main() -> None:
    """Entry point of ``python -m libs.eventbus.relay``."""
    asyncio.run(_main())


if __name__ == "__main__":
    main()
