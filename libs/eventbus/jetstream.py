"""Every JetStream stream and consumer setting, declared in one place.

* ``MC_EVENTS`` holds every event the relay publishes. No age or size limit and ``DiscardNew``:
  when the server is full a publish fails loudly instead of silently evicting history.
  ``duplicate_window`` bounds ``Nats-Msg-Id`` deduplication; duplicates older than the window are
  absorbed by the consumers' applied-event records. ``allow_atomic`` lets the relay publish
  atomic batches (all or nothing, one acknowledgement each).
* ``MC_DLQ`` keeps poison messages for 30 days for inspection and manual replay.
* ``MC_WORK`` is a work queue: each dispatched workflow step is delivered to one worker of its
  agent and removed when acknowledged. Its hour-long ``duplicate_window`` makes the engine's
  re-publication of a dispatch after a crash (same ``Nats-Msg-Id``, the attempt's run id) a
  no-op.
* ``MC_LIVE`` carries live telemetry: the usage workers stream while a step runs, for viewers
  (the SSE endpoints). It is not a record: an hour's age limit, a bound per run and in bytes,
  and the oldest messages make room (``DiscardOld``). What a step used is its recorded step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from pydantic import SecretStr

from libs.contracts.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    LIVE_PREFIX,
    LIVE_STREAM,
    WORK_PREFIX,
    WORK_STREAM,
    inbox_prefix,
)

log = structlog.get_logger("jetstream")

DUPLICATE_WINDOW_S = 120.0

EVENTS = StreamConfig(
    name=EVENTS_STREAM,
    subjects=[f"{EVENTS_PREFIX}.>"],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    discard=DiscardPolicy.NEW,
    max_msgs=-1,
    max_bytes=-1,
    max_age=0,
    duplicate_window=DUPLICATE_WINDOW_S,
    num_replicas=1,
    # The relay publishes atomic batches (nats-server 2.12+): one ack and one fsync per batch.
    allow_atomic=True,
)

DLQ = StreamConfig(
    name=DLQ_STREAM,
    subjects=[f"{DLQ_PREFIX}.>"],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    discard=DiscardPolicy.NEW,
    max_age=30 * 24 * 3600.0,
    num_replicas=1,
)


WORK_DUPLICATE_WINDOW_S = 3600.0

WORK = StreamConfig(
    name=WORK_STREAM,
    subjects=[f"{WORK_PREFIX}.>"],
    retention=RetentionPolicy.WORK_QUEUE,
    storage=StorageType.FILE,
    discard=DiscardPolicy.NEW,
    duplicate_window=WORK_DUPLICATE_WINDOW_S,
    num_replicas=1,
)


LIVE_MAX_AGE_S = 3600.0

LIVE = StreamConfig(
    name=LIVE_STREAM,
    subjects=[f"{LIVE_PREFIX}.>"],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    discard=DiscardPolicy.OLD,
    max_age=LIVE_MAX_AGE_S,
    max_bytes=256 * 1024 * 1024,
    # A run's progress is one subject: its newest reports are what a viewer needs.
    max_msgs_per_subject=10_000,
    num_replicas=1,
)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer on ``MC_EVENTS``.

    ``ack_wait`` must exceed the handler's p99, and ``fetch_batch`` stays well below
    ``max_ack_pending`` so a slow batch never starves the consumer into redelivery storms.
    """

    durable: str
    filter_subjects: tuple[str, ...]
    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.2, 1.0, 5.0, 15.0)
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    fetch_batch: int = 100
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    stream: str = EVENTS_STREAM

    def config(self) -> ConsumerConfig:
        """The JetStream consumer configuration."""
        subjects = list(self.filter_subjects)
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=self.deliver_policy,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            # JetStream requires len(backoff) <= max_deliver; the first entry overrides ack_wait
            # for redelivery after a missed ack, so keep it generous relative to handler time.
            backoff=None,
            max_ack_pending=self.max_ack_pending,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )

    def delay_for(self, delivery: int) -> float:
        """Delay before redelivering after the ``delivery``-th failed attempt."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(max(delivery, 1), len(self.backoff)) - 1]


async def connect(url: str, name: str, credentials: tuple[str, SecretStr] | None = None) -> NATS:
    """A NATS connection that keeps reconnecting while the server restarts.

    With ``credentials`` (user, password) it logs in as that user, and its inbox (where replies
    and fetched messages arrive) is the user's own, ``_INBOX.<user>.``, the only one its
    permissions let it subscribe to (:mod:`libs.runtime.busauth`).
    """
    auth: dict[str, Any] = {}
    if credentials is not None:
        user, password = credentials
        auth = {
            "user": user,
            "password": password.get_secret_value(),
            "inbox_prefix": inbox_prefix(user),
        }
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        allow_reconnect=True,
        **auth,
    )


async def ensure_streams(js: JetStreamContext, *, update: bool = True) -> None:
    """Create the streams above, or update them to match (idempotent; safe from every process).

    Only the relay may update a stream when the bus has users (:mod:`libs.runtime.busauth`); the
    services pass ``update=False``: a stream that exists with other settings is left for the
    relay to bring up to date.
    """
    for cfg in (EVENTS, DLQ, WORK, LIVE):
        try:
            await js.add_stream(cfg)
        except BadRequestError as exc:
            if update:
                await js.update_stream(cfg)
            else:
                log.info("stream.config_differs", stream=cfg.name, error=str(exc))


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Create the durable consumer, or update it to match ``spec``."""
    try:
        await js.add_consumer(spec.stream, spec.config())
    except BadRequestError as exc:
        # An existing durable with other settings keeps its position and old settings; deleting
        # it to apply new ones would replay or skip history, so that is left to an operator.
        log.warning("consumer.config_differs", durable=spec.durable, error=str(exc))
