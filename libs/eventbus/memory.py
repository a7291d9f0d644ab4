"""An in-memory twin of :class:`~libs.eventbus.store.EventStore`, for unit tests of handlers.

Same append and read semantics as the PostgreSQL store, checked by one contract suite run against
both (``tests/unit/test_eventstore_contract.py`` and
``tests/integration/test_eventstore_contract.py``): per-stream versions from 1, an increasing
global position, ``expected_version`` (``None``
any, ``0`` new stream, ``n`` exactly at ``n``) raising :class:`~libs.errors.ConcurrencyError`,
all-or-nothing multi-stream appends, the size limit, the hash chain (scheme 2: over each event's
position and recorded_at too) and the stream heads moved with every append. Transactions
(:meth:`InMemoryEventStore.begin`) buffer their appends until they commit. Positions here follow
commit order; the real store's log order is ``(log_xid, position)`` (see its module docstring),
which the twin does not model: code that needs "everything up to here" across streams belongs
in integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import EventEnvelope, utcnow
from libs.errors import ConcurrencyError, InvalidInput
from libs.eventbus.store import (
    GENESIS,
    MAX_EVENT_BYTES,
    Append,
    StreamHead,
    chain_hash_v2,
)


class InMemoryEventStore:
    """Streams in a dict; one process, one event loop."""

    def __init__(self) -> None:
        self._log: list[EventEnvelope] = []
        self._streams: dict[str, list[EventEnvelope]] = {}
        self._heads: dict[str, StreamHead] = {}
        self._next_position = 1
        self._append_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}

    # --- the EventStore API ----------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[EventEnvelope],
        expected_version: int | None = None,
        *,
        conn: Any = None,
    ) -> list[EventEnvelope]:
        """Append ``events`` to one stream; return them with versions and positions set."""
        return await self.append_many([Append(stream_id, events, expected_version)])

    async def append_many(
        self, appends: Sequence[Append], *, conn: Any = None
    ) -> list[EventEnvelope]:
        """Append to several streams atomically."""
        async with self.begin() as uow:
            return await uow.append_many(appends)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, *, conn: Any = None
    ) -> list[EventEnvelope]:
        """Events of one stream with ``stream_version >= from_version``, in order."""
        return list(self._streams.get(stream_id, [])[max(from_version, 1) - 1 :])

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]], *, conn: Any = None
    ) -> dict[str, list[EventEnvelope]]:
        """Several streams: ``{stream_id: events with version >= from}``."""
        return {sid: await self.read_stream(sid, v) for sid, v in ranges}

    async def read_all(
        self, after_position: int = 0, limit: int = 1000, *, tenant_id: str | None = None
    ) -> list[EventEnvelope]:
        """Up to ``limit`` events with ``position > after_position``, in store order."""
        out = [
            e
            for e in self._log
            if (e.position or 0) > after_position and tenant_id in (None, e.tenant_id)
        ]
        return out[:limit]

    async def iter_all(
        self, after_position: int = 0, batch: int = 5000
    ) -> AsyncIterator[list[EventEnvelope]]:
        """The whole log in batches."""
        pos = after_position
        while rows := await self.read_all(pos, batch):
            yield rows
            pos = rows[-1].position or pos

    async def stream_head(self, stream_id: str) -> StreamHead | None:
        """The head of ``stream_id`` as the append that last moved it recorded it."""
        return self._heads.get(stream_id)

    async def head_position(self) -> int:
        """The highest position (0 when empty)."""
        return (self._log[-1].position or 0) if self._log else 0

    # --- transactions ----------------------------------------------------------------------------

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[MemoryUnitOfWork]:
        """A transaction: its appends become visible to others when the block ends cleanly."""
        uow = MemoryUnitOfWork(self)
        try:
            yield uow
        except BaseException:
            uow._release()
            raise
        uow._commit()

    def _version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))


class MemoryUnitOfWork:
    """:class:`~libs.eventbus.uow.UnitOfWork` on an :class:`InMemoryEventStore`."""

    conn: None = None

    def __init__(self, store: InMemoryEventStore) -> None:
        self.store = store
        self._pending: list[EventEnvelope] = []
        self._heads: dict[str, StreamHead] = {}
        self._holds_append_lock = False
        self._locks: list[asyncio.Lock] = []
        self._held: set[str] = set()
        self._callbacks: list[Callable[[], None]] = []

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]]
    ) -> dict[str, list[EventEnvelope]]:
        """Committed events plus this transaction's own appends."""
        out: dict[str, list[EventEnvelope]] = {}
        for sid, from_version in ranges:
            mine = [e for e in self._pending if e.stream_id == sid]
            events = [*self.store._streams.get(sid, []), *mine]
            out[sid] = events[max(from_version, 1) - 1 :]
        return out

    async def append_many(self, appends: Sequence[Append]) -> list[EventEnvelope]:
        """Check versions and stage the events (under the append lock, held until the end)."""
        if not any(a.events for a in appends):
            return []
        if not self._holds_append_lock:
            await self.store._append_lock.acquire()
            self._holds_append_lock = True
        staged: list[tuple[EventEnvelope, bytes]] = []
        for a in appends:
            if not a.events:
                continue
            mine = [
                e for e in (*self._pending, *(s for s, _ in staged)) if e.stream_id == a.stream_id
            ]
            version = self.store._version(a.stream_id) + len(mine)
            if a.expected_version is not None and a.expected_version != version:
                raise ConcurrencyError(a.stream_id, a.expected_version, version)
            for e in a.events:
                if e.stream_id != a.stream_id:
                    raise InvalidInput(
                        f"event {e.event_id} is for {e.stream_id}, not {a.stream_id}"
                    )
                version += 1
                env = e.model_copy(update={"stream_version": version})
                body = canonical_json(env.hashed_fields())
                if len(body) > MAX_EVENT_BYTES:
                    raise InvalidInput(
                        f"{e.event_type} event is {len(body):,} bytes of JSON, over the limit "
                        f"of {MAX_EVENT_BYTES:,}"
                    )
                staged.append((env, body))
        # Positions are taken only once the whole append is valid (a refused one burns none),
        # and before hashing: the hash covers position and recorded_at, as in the real store.
        heads = dict(self._heads)
        out = []
        for env, body in staged:
            env = env.model_copy(
                update={"position": self.store._next_position, "recorded_at": utcnow()}
            )
            self.store._next_position += 1
            head = heads.get(env.stream_id) or self.store._heads.get(env.stream_id)
            digest = chain_hash_v2(head.hash if head else GENESIS, env, body)
            heads[env.stream_id] = StreamHead(
                env.stream_id, env.tenant_id, env.stream_version, digest, env.position or 0
            )
            out.append(env)
        self._pending.extend(out)
        self._heads = heads
        return out

    async def lock(self, key: str) -> None:
        """An exclusive lock on ``key`` until this transaction ends (re-entrant within it)."""
        if key in self._held:
            return
        lock = self.store._locks.setdefault(key, asyncio.Lock())
        await lock.acquire()
        self._locks.append(lock)
        self._held.add(key)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Undo only what the block staged when it raises."""
        mark, heads, callbacks = len(self._pending), dict(self._heads), len(self._callbacks)
        try:
            yield
        except BaseException:
            del self._pending[mark:]
            del self._callbacks[callbacks:]  # what was undone must not be remembered at commit
            self._heads = heads
            raise

    def wrote(self, stream_id: str) -> bool:
        """Whether this transaction has staged events for ``stream_id``."""
        return any(e.stream_id == stream_id for e in self._pending)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after this transaction commits."""
        self._callbacks.append(callback)

    def _commit(self) -> None:
        for env in self._pending:
            self.store._streams.setdefault(env.stream_id, []).append(env)
            self.store._log.append(env)
        self.store._heads.update(self._heads)
        self._pending = []
        self._release()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _release(self) -> None:
        if self._holds_append_lock:
            self.store._append_lock.release()
            self._holds_append_lock = False
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()
        self._held.clear()
