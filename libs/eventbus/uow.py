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
        """A transaction-scoped advisory lock on ``key`` (held by whichever replica took it)."""
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """``SAVEPOINT`` ... ``RELEASE`` (or ``ROLLBACK TO`` on error)."""
        async with self._conn.transaction():
            yield

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
