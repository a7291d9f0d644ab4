"""Units of work on the event store: one transaction that reads streams, appends and commits.

:class:`UnitOfWork` is the port the application layer (:mod:`libs.eventbus.repository`) works
through. :class:`PgUnitOfWork` is the PostgreSQL adapter: either its own transaction
(:func:`begin`) or a transaction somebody else owns and commits (:func:`join`, for example a
consumer's, which records the applied event in the same transaction as the effect). The
in-memory twin is :class:`libs.eventbus.memory.MemoryUnitOfWork`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from libs.contracts.envelope import EventEnvelope
from libs.errors import ConcurrencyError
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.store import Append, EventStore


class UnitOfWork(Protocol):
    """One transaction on the event store (the port)."""

    @property
    def conn(self) -> AsyncConn | None:
        """The PostgreSQL connection, for effects on the service's own tables (else ``None``)."""

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]]
    ) -> dict[str, list[EventEnvelope]]:
        """Several streams in one read: ``{stream_id: events with version >= from}``."""

    async def append_many(self, appends: Sequence[Append]) -> list[EventEnvelope]:
        """Append to several streams in this transaction (all or none)."""

    async def lock(self, key: str) -> None:
        """Hold an exclusive lock named ``key`` until this transaction ends (across replicas)."""

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested transaction: an error inside undoes only what was done inside."""

    def wrote(self, stream_id: str) -> bool:
        """Whether this transaction appended to ``stream_id`` (its reads see its own writes)."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this transaction has committed.

        A joined transaction commits out of this object's sight: there callbacks are dropped, so
        they may only carry optional work (moving a cache forward, say).
        """


class PgUnitOfWork:
    """:class:`UnitOfWork` on one PostgreSQL connection inside a transaction."""

    def __init__(self, store: EventStore, conn: AsyncConn, *, owned: bool) -> None:
        self.store = store
        self._conn = conn
        self.owned = owned
        self._callbacks: list[Callable[[], None]] = []
        self._written: set[str] = set()
        self._locked: set[str] = set()

    @property
    def conn(self) -> AsyncConn:
        """The connection the transaction runs on."""
        return self._conn

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]]
    ) -> dict[str, list[EventEnvelope]]:
        """Several streams in one round trip."""
        return await self.store.read_streams(ranges, conn=self._conn)

    async def append_many(self, appends: Sequence[Append]) -> list[EventEnvelope]:
        """Append in this transaction."""
        self._written.update(a.stream_id for a in appends if a.events)
        return await self.store.append_many(appends, conn=self._conn)

    def wrote(self, stream_id: str) -> bool:
        """Whether this transaction appended (or tried to append) to ``stream_id``."""
        return stream_id in self._written

    async def lock(self, key: str) -> None:
        """A transaction-scoped advisory lock on ``key`` (held by whichever replica took it).

        A key this transaction already holds costs no round trip: a batch locks its runs up
        front and each decision in it asks again.
        """
        if key in self._locked:
            return
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        self._locked.add(key)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """``SAVEPOINT`` ... ``RELEASE`` (or ``ROLLBACK TO`` on error)."""
        mark, locked = len(self._callbacks), set(self._locked)
        try:
            async with self._conn.transaction():
                yield
        except BaseException:
            del self._callbacks[mark:]  # what was undone must not be remembered at commit
            self._locked = locked  # rolling back to a savepoint releases the locks taken after it
            raise

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Remembered when this transaction is ours; dropped when it was joined."""
        if self.owned:
            self._callbacks.append(callback)

    def _committed(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()


@asynccontextmanager
async def begin(store: EventStore) -> AsyncIterator[PgUnitOfWork]:
    """A unit of work in a new transaction, committed when the block ends without error."""
    async with transaction(store.pool) as conn:
        uow = PgUnitOfWork(store, conn, owned=True)
        yield uow
    uow._committed()


def join(store: EventStore, conn: AsyncConn) -> PgUnitOfWork:
    """A unit of work inside the caller's transaction on ``conn`` (the caller commits it)."""
    return PgUnitOfWork(store, conn, owned=False)


class DeferredAppends:
    """A unit of work whose appends are held back and written together by :meth:`flush`.

    For batches decided one after the other in one transaction (admission's group commit): each
    decision reads its own and earlier decisions' events (read from ``inner`` plus what is held
    back), and the store sees one multi-stream append just before the commit, so whatever the
    append locks is held only for that last moment. Savepoints are in memory: a decision that
    fails drops only what it held back. Every append must carry its expected version (the held
    events are numbered from it); the store checks them all at :meth:`flush`.
    """

    def __init__(self, inner: UnitOfWork) -> None:
        self.inner = inner
        self._held: list[Append] = []
        self._callbacks: list[Callable[[], None]] = []
        self._flushed = False

    @property
    def conn(self) -> AsyncConn | None:
        """The inner unit of work's connection."""
        return self.inner.conn

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]]
    ) -> dict[str, list[EventEnvelope]]:
        """The inner read plus the held-back events of those streams."""
        out = await self.inner.read_streams(ranges)
        for sid, from_version in ranges:
            held = [e for a in self._held if a.stream_id == sid for e in a.events]
            out[sid] = [*out.get(sid, []), *(e for e in held if e.stream_version >= from_version)]
        return out

    async def append_many(self, appends: Sequence[Append]) -> list[EventEnvelope]:
        """Hold ``appends`` back; return their events numbered from the expected versions."""
        out: list[EventEnvelope] = []
        for a in appends:
            if not a.events:
                continue
            if a.expected_version is None:
                raise ValueError(f"a deferred append to {a.stream_id} needs an expected version")
            mine = [e for h in self._held if h.stream_id == a.stream_id for e in h.events]
            # Versions after what is held back are checked here; the rest at flush.
            if mine and mine[-1].stream_version != a.expected_version:
                raise ConcurrencyError(a.stream_id, a.expected_version, mine[-1].stream_version)
            held = [
                e.model_copy(update={"stream_version": a.expected_version + i})
                for i, e in enumerate(a.events, start=1)
            ]
            self._held.append(Append(a.stream_id, held, a.expected_version))
            out.extend(held)
        return out

    async def flush(self) -> list[EventEnvelope]:
        """Append everything held back, one append per stream, in the inner transaction."""
        merged: dict[str, Append] = {}
        for a in self._held:
            known = merged.get(a.stream_id)
            merged[a.stream_id] = (
                a
                if known is None
                else Append(a.stream_id, [*known.events, *a.events], known.expected_version)
            )
        self._held = []
        stored = await self.inner.append_many(list(merged.values())) if merged else []
        self._flushed = True
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self.inner.after_commit(cb)
        return stored

    async def lock(self, key: str) -> None:
        """The inner unit of work's lock."""
        await self.inner.lock(key)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Drop what the block held back when it raises (nothing reached the store yet)."""
        mark, callbacks = len(self._held), len(self._callbacks)
        try:
            yield
        except BaseException:
            del self._held[mark:]
            del self._callbacks[callbacks:]
            raise

    def wrote(self, stream_id: str) -> bool:
        """Whether anything is held back for ``stream_id``, or the inner unit wrote it."""
        return any(a.stream_id == stream_id for a in self._held) or self.inner.wrote(stream_id)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Handed to the inner unit of work at :meth:`flush` (dropped with a savepoint)."""
        if self._flushed:
            self.inner.after_commit(callback)
        else:
            self._callbacks.append(callback)
