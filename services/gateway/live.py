"""Live tokens for viewers: Server-Sent Events of a run's or an execution's events and progress,
and of a whole tenant's events.

``GET /v1/runs/{run_id}/events`` and ``GET /v1/executions/{execution_id}/events`` answer
``text/event-stream``. Each stream merges two JetStream streams, read through ephemeral push
consumers the gateway creates for the connection and that go with it:

* ``MC_EVENTS``, the durable events (``mc.evt.<tenant>.<type>``, only the caller's tenant),
  kept when they belong to the run (its stream, or naming its ``run_id``) or to the execution
  (its stream, or one of its attempts' runs); ``event:`` is the event type and ``data:`` the
  envelope;
* ``MC_LIVE``, the usage workers report while a step runs (``mc.live.<tenant>.<execution>.<run>``),
  as ``event: usage``.

Every message has ``id: <events sequence>-<live sequence>``: how far the connection has read
each stream. A client that reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` does it
by itself) resumes exactly after that message in both streams: nothing twice, nothing left out
(except live reports older than ``MC_LIVE``'s hour). A first connection starts with
``event: snapshot`` (the run or execution as it stands) and then everything after it. A comment
line (``: heartbeat``) goes out after ``heartbeat_s`` seconds without a message (15 by
default), so proxies keep the connection and clients notice a dead one. When the run or
execution ends, ``event: end`` is sent (without an ``id:``; its data names the cursor) and the
response closes.

``GET /v1/live`` follows the caller's whole tenant: every durable event of the tenant (no usage
reports: ``MC_LIVE`` is not read, and the live half of ``id:`` stays as it was), first
``event: snapshot`` with ``{"runs": [...]}`` (the running runs, as ``GET /v1/runs`` lists them),
never an ``event: end``. The same bounds, heartbeats and ``Last-Event-ID`` resumption apply.

Resources are bounded: a process serves at most ``MC_SSE_MAX_STREAMS`` streams (503 above) and
a tenant at most ``MC_SSE_MAX_STREAMS_PER_TENANT`` (429 with ``Retry-After``). A connection's
consumers are unsubscribed when it ends, and the server deletes them a few seconds later
(``inactive_threshold``); a client too slow for its stream, or a consumer that stops sending
heartbeats, has its response closed, and resumes with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from libs import errors
from libs.contracts.subjects import EVENTS_STREAM, LIVE_STREAM, events_filter, live_filter

log = structlog.get_logger("gateway.live")

MEDIA_TYPE = "text/event-stream"
DEFAULT_HEARTBEAT_S = 15.0
MIN_HEARTBEAT_S = 1.0
MAX_HEARTBEAT_S = 60.0
RETRY_MS = 2000
"""What a client waits before reconnecting (``retry:``)."""
CONSUMER_HEARTBEAT_S = 2.0
"""The consumers' idle heartbeat: a consumer silent for :data:`STALLED_S` is gone."""
STALLED_S = 3 * CONSUMER_HEARTBEAT_S + 1
INACTIVE_THRESHOLD_S = 5.0
"""How long the server keeps a consumer nobody listens to before deleting it."""
MAX_QUEUED = 10_000
"""Messages read ahead of a slow client; past it the response closes (the client resumes)."""
POLL_S = 1.0
"""How often a quiet stream checks whether its client is still there."""
_CURSOR = re.compile(r"^(\d{1,19})-(\d{1,19})$")

Kind = Literal["run", "execution", "tenant"]


class Cursor(NamedTuple):
    """How far a connection has read ``MC_EVENTS`` and ``MC_LIVE`` (stream sequences)."""

    events: int
    live: int

    def __str__(self) -> str:
        return f"{self.events}-{self.live}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """A ``Last-Event-ID`` this API sent; :class:`InvalidInput` for anything else."""
        m = _CURSOR.match(text.strip())
        if m is None:
            raise errors.InvalidInput(
                "Last-Event-ID: expected '<events sequence>-<live sequence>' as sent in 'id:'"
            )
        return cls(int(m.group(1)), int(m.group(2)))


class TooManyStreams(errors.Overloaded):
    """The tenant has as many event streams open as it may."""


class StreamSlots:
    """Counts open streams, per tenant and in the process, and refuses those above the bounds."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = total
        self.per_tenant = per_tenant
        self.open: dict[str, int] = {}

    def acquire(self, tenant_id: str) -> None:
        """Take a slot; 429 over the tenant's bound, 503 over the process's."""
        if self.open.get(tenant_id, 0) >= self.per_tenant:
            raise TooManyStreams(
                f"tenant {tenant_id} has {self.per_tenant} event streams open, its limit; close "
                "one or retry later"
            )
        if sum(self.open.values()) >= self.total:
            raise errors.TransientError(
                f"the gateway serves {self.total} event streams, its limit; retry later"
            )
        self.open[tenant_id] = self.open.get(tenant_id, 0) + 1

    def release(self, tenant_id: str) -> None:
        """Give a slot back."""
        left = self.open.get(tenant_id, 0) - 1
        if left > 0:
            self.open[tenant_id] = left
        else:
            self.open.pop(tenant_id, None)


@dataclass(frozen=True)
class Target:
    """What a stream follows: one run, one execution and its attempts' runs, or the whole
    tenant (``kind`` ``tenant``, ``id`` the tenant: every durable event, no usage reports)."""

    tenant_id: str
    kind: Kind
    id: str

    @property
    def stream_id(self) -> str:
        return f"{self.tenant_id}/{self.kind}/{self.id}"

    def event_filters(self) -> list[str]:
        t = self.tenant_id
        if self.kind == "tenant":
            return [events_filter(">", t)]
        subjects = [events_filter("run.>", t), events_filter("cost.recorded", t)]
        if self.kind == "execution":
            subjects.append(events_filter("execution.>", t))
        return subjects

    @property
    def follows_usage(self) -> bool:
        """Whether the stream carries live usage reports (a run's or an execution's do)."""
        return self.kind != "tenant"

    def live_filter(self) -> str:
        if self.kind == "run":
            return live_filter(self.tenant_id, run_id=self.id)
        return live_filter(self.tenant_id, execution_id=self.id)

    def belongs(self, env: dict[str, Any]) -> bool:
        """Whether an event (envelope) is about this run or execution."""
        if env.get("tenant_id") != self.tenant_id:
            return False
        if self.kind == "tenant":
            return True
        stream_id = str(env.get("stream_id", ""))
        if stream_id == self.stream_id:
            return True
        payload = env.get("payload") or {}
        run_id = str(payload.get("run_id") or "")
        if self.kind == "run":
            return run_id == self.id
        prefix = f"{self.tenant_id}/run/{self.id}:"
        return stream_id.startswith(prefix) or run_id.startswith(f"{self.id}:")

    def ends(self, env: dict[str, Any]) -> bool:
        """Whether the event ends the run or execution."""
        if self.kind == "tenant" or env.get("stream_id") != self.stream_id:
            return False
        kind = str(env.get("event_type", ""))
        if self.kind == "run":
            return kind in ("run.completed", "run.stopped_by_policy")
        return kind in (
            "execution.completed",
            "execution.failed",
            "execution.aborted",
            "execution.budget_exceeded",
        )

    def ended(self, snapshot: dict[str, Any]) -> bool:
        """Whether the snapshot shows it ended."""
        status = snapshot.get("status")
        if self.kind == "tenant":
            return False
        if self.kind == "run":
            return status in ("completed", "failed", "stopped_by_policy")
        return status in ("completed", "failed", "aborted")


@dataclass(frozen=True)
class _Delivery:
    stream: str
    seq: int
    data: bytes


@dataclass(frozen=True)
class _Broken:
    why: str


class _Feed:
    """One ephemeral push consumer, delivering into the connection's queue."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        filters: list[str],
        start_seq: int,
        queue: asyncio.Queue[_Delivery | _Broken],
    ) -> None:
        self.nc, self.js, self.stream = nc, js, stream
        self.filters, self.start_seq, self.queue = filters, start_seq, queue
        self.sub: Any = None
        self.delivered = 0
        self.drain_to = 0
        self.last_seen = time.monotonic()

    async def start(self) -> None:
        inbox = self.nc.new_inbox()
        # Subscribed before the consumer exists, so its first message has somewhere to go.
        self.sub = await self.nc.subscribe(inbox, cb=self._on)
        config = ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(self.start_seq, 1),
            filter_subject=self.filters[0] if len(self.filters) == 1 else None,
            filter_subjects=self.filters if len(self.filters) > 1 else None,
            flow_control=True,
            idle_heartbeat=CONSUMER_HEARTBEAT_S,
            inactive_threshold=INACTIVE_THRESHOLD_S,
            mem_storage=True,
        )
        info = await self.js.add_consumer(self.stream, config)
        # What the consumer had to deliver when made: delivered already (possibly still in our
        # inbox) plus pending. A stream of something that has ended stops once it has all.
        sent = info.delivered.consumer_seq if info.delivered is not None else 0
        self.drain_to = sent + (info.num_pending or 0)

    @property
    def caught_up(self) -> bool:
        """Whether everything there was when the consumer was made has been delivered."""
        return self.delivered >= self.drain_to

    async def _on(self, msg: Msg) -> None:
        self.last_seen = time.monotonic()
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":  # a heartbeat, or flow control to answer
            for reply in (msg.reply, headers.get("Nats-Consumer-Stalled")):
                if reply:
                    await self.nc.publish(reply, b"")
            return
        try:
            if status:
                raise ValueError(f"status {status} {headers.get('Description', '')}")
            md = msg.metadata
        except Exception as exc:  # the consumer went away, or this is no stream message
            self.queue.put_nowait(_Broken(f"{self.stream}: {exc}"))
            return
        if md.sequence.consumer != self.delivered + 1:
            self.queue.put_nowait(_Broken(f"{self.stream}: a message was missed"))
            return
        self.delivered = md.sequence.consumer
        if self.queue.qsize() >= MAX_QUEUED:
            self.queue.put_nowait(_Broken("the client reads too slowly"))
            return
        self.queue.put_nowait(_Delivery(self.stream, md.sequence.stream, msg.data))

    async def stop(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


def sse(event: str, data: Any, cursor: Cursor | None) -> str:
    """One SSE message (its data one line of JSON)."""
    head = f"id: {cursor}\n" if cursor is not None else ""
    return f"{head}event: {event}\ndata: {orjson.dumps(data).decode()}\n\n"


class LiveStream:
    """One client's event stream: opened (404, 429 and 503 are answered before any byte of
    the stream), iterated, closed (once, whatever happens)."""

    def __init__(
        self,
        target: Target,
        nc: NATS,
        js: JetStreamContext,
        slots: StreamSlots,
        heartbeat_s: float,
    ) -> None:
        self.target, self.nc, self.js, self.slots = target, nc, js, slots
        self.heartbeat_s = heartbeat_s
        self.queue: asyncio.Queue[_Delivery | _Broken] = asyncio.Queue()
        self.feeds: list[_Feed] = []
        self.snapshot: dict[str, Any] | None = None
        self.cursor = Cursor(0, 0)
        self.ended = False
        self._slot = False

    async def open(
        self, resume: Cursor | None, load: Callable[[], Awaitable[dict[str, Any]]]
    ) -> None:
        """Take a slot, read the state (404 for an unknown id) and start the consumers."""
        self.slots.acquire(self.target.tenant_id)
        self._slot = True
        try:
            if resume is None:
                # The streams' ends before the state is read: whatever happens after it follows.
                events = await self.js.stream_info(EVENTS_STREAM)
                live = await self.js.stream_info(LIVE_STREAM)
                self.cursor = Cursor(events.state.last_seq, live.state.last_seq)
            else:
                self.cursor = resume
            state = await load()
            self.snapshot = state if resume is None else None
            self.ended = self.target.ended(state)
            self.feeds = [
                _Feed(self.nc, self.js, EVENTS_STREAM, self.target.event_filters(),
                      self.cursor.events + 1, self.queue),
            ]  # fmt: skip
            if self.target.follows_usage:
                self.feeds.append(
                    _Feed(self.nc, self.js, LIVE_STREAM, [self.target.live_filter()],
                          self.cursor.live + 1, self.queue)
                )  # fmt: skip
            for feed in self.feeds:
                await feed.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the consumers and give the slot back (idempotent)."""
        for feed in self.feeds:
            await feed.stop()
        if self._slot:
            self._slot = False
            self.slots.release(self.target.tenant_id)

    async def messages(self, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """The SSE text, until the run or execution ends or the client goes."""
        yield f"retry: {RETRY_MS}\n\n"
        if self.snapshot is not None:
            yield sse("snapshot", self.snapshot, self.cursor)
        last_write = time.monotonic()
        while True:
            if self.ended and self.queue.empty() and all(f.caught_up for f in self.feeds):
                yield sse("end", {"cursor": str(self.cursor)}, None)
                return
            quiet = time.monotonic() - last_write
            try:
                item = await asyncio.wait_for(
                    self.queue.get(), max(0.01, min(POLL_S, self.heartbeat_s - quiet))
                )
            except TimeoutError:
                item = None
            if await disconnected():
                return
            now = time.monotonic()
            if item is None:
                if any(now - f.last_seen > STALLED_S for f in self.feeds):
                    log.info("live.consumer_stalled", target=self.target.id)
                    return  # the client resumes with Last-Event-ID on fresh consumers
                if now - last_write >= self.heartbeat_s:
                    yield ": heartbeat\n\n"
                    last_write = now
                continue
            if isinstance(item, _Broken):
                log.info("live.stream_broken", target=self.target.id, why=item.why)
                return
            text, ends = self._render(item)
            if text is not None:
                yield text
                last_write = now
            # The end is sent once what has arrived so far is out (the loop's first check).
            self.ended = self.ended or ends

    def _render(self, d: _Delivery) -> tuple[str | None, bool]:
        if d.stream == LIVE_STREAM:
            self.cursor = Cursor(self.cursor.events, d.seq)
            return sse("usage", orjson.loads(d.data), self.cursor), False
        env = orjson.loads(d.data)
        if not isinstance(env, dict) or not self.target.belongs(env):
            return None, False
        self.cursor = Cursor(d.seq, self.cursor.live)
        return sse(str(env.get("event_type", "event")), env, self.cursor), self.target.ends(env)


class EventStreamResponse(StreamingResponse):
    """The stream's response: closes the stream when the response ends, however it ends."""

    def __init__(self, stream: LiveStream, request: Request) -> None:
        super().__init__(
            stream.messages(request.is_disconnected),
            media_type=MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()


async def open_stream(
    request: Request,
    target: Target,
    load: Callable[[], Awaitable[dict[str, Any]]],
    last_event_id: str | None,
    heartbeat_s: float | None,
) -> EventStreamResponse:
    """The SSE response for ``target``, opened (or the error to answer instead)."""
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise errors.TransientError("the gateway is not started")
    slots: StreamSlots | None = getattr(request.app.state, "live_slots", None)
    if slots is None:
        settings = ctx.settings
        slots = StreamSlots(settings.sse_max_streams, settings.sse_max_streams_per_tenant)
        request.app.state.live_slots = slots
    resume = Cursor.parse(last_event_id) if last_event_id else None
    beat = heartbeat_s if heartbeat_s is not None else ctx.settings.sse_heartbeat_s
    stream = LiveStream(target, ctx.nc, ctx.js, slots, beat)
    await stream.open(resume, load)
    return EventStreamResponse(stream, request)
