"""PostgreSQL connection pools and the translation of psycopg errors into project errors."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import psycopg
import psycopg.errors
import structlog
from psycopg.rows import dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from libs.errors import Conflict, MissionControlError, TransientError, first_line

log = structlog.get_logger("eventstore")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


set_json_dumps(_dumps)
set_json_loads(orjson.loads)

AsyncConn = psycopg.AsyncConnection[dict[str, Any]]


async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0
) -> AsyncConnectionPool:
    """An open async pool whose connections return rows as dicts.

    ``timeout`` bounds how long a caller waits for a connection (for example while the server
    restarts) before getting a :class:`~libs.errors.TransientError`.
    """
    pool: AsyncConnectionPool = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": False},
        open=False,
        timeout=timeout,
    )
    try:
        await pool.open(wait=True, timeout=30)
    except Exception as exc:
        raise translate(exc) from exc
    return pool


def translate(exc: BaseException) -> MissionControlError:
    """Map a psycopg (or pool) exception onto the project hierarchy."""
    if isinstance(exc, MissionControlError):
        return exc
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return Conflict(first_line(exc))
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.SerializationFailure):
        return TransientError(f"database unavailable: {first_line(exc)}")
    if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.AdminShutdown):
        return TransientError(first_line(exc))
    if exc.__class__.__name__ == "PoolTimeout":
        return TransientError("database pool exhausted or unreachable")
    return MissionControlError(f"database error: {first_line(exc)}")


TENANT_SCOPE_SETTING = "mc.tenant_id"
"""The setting a transaction reading for one tenant is scoped with. Row-level security on
``eventstore.events`` (migration 0003) then shows readers that tenant's rows only."""


async def scope_to_tenant(conn: AsyncConn, tenant_id: str) -> None:
    """``SET LOCAL mc.tenant_id``: until the end of ``conn``'s transaction, the rows it reads are
    ``tenant_id``'s alone, whatever the query's own filter says."""
    await conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SCOPE_SETTING, tenant_id))


# Connections inside a transaction() block, and those of them that appended events there.
_managed: weakref.WeakSet[AsyncConn] = weakref.WeakSet()
_appended: weakref.WeakSet[AsyncConn] = weakref.WeakSet()


def appended_on(conn: AsyncConn) -> bool:
    """Note that ``conn`` appended events; return whether the wake-up can wait for the commit.

    True when ``conn`` is inside a :func:`transaction` block, which wakes the relay after the
    commit. False for a transaction the caller manages itself: the caller must notify inside it.
    """
    if conn in _managed:
        _appended.add(conn)
        return True
    return False


class CommitSignal:
    """Wakes the relay (``NOTIFY``) after appending transactions commit, coalescing bursts.

    ``NOTIFY`` inside an appending transaction would take PostgreSQL's database-wide notify lock
    and hold it through that transaction's commit (WAL flush included), which serialises every
    appending commit again. Sent after the commit on its own autocommit connection, it holds
    that lock for a transaction with no WAL flush. Pokes that arrive while one is on its way, or
    within ``spacing`` seconds of the last, fold into the next one: under load this is a few
    hundred notifications a second at most, not one per append, at a cost of ``spacing`` to the
    relay's wake-up.
    """

    def __init__(self, conninfo: str, channel: str, spacing: float = 0.002) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.spacing = spacing
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def poke(self) -> None:
        """Ask for one ``NOTIFY`` after the last commit seen so far."""
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            self._pending = False
            sent = loop.time()
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self.conninfo, autocommit=True
                    )
                await self._conn.execute("SELECT pg_notify(%s, '')", (self.channel,))
            except Exception as exc:
                # The relay also polls when idle, so a lost wake-up only costs latency.
                log.warning("eventstore.notify_failed", error=type(exc).__name__)
                self._conn = None
                return
            # Spacing, not synchronisation: later commits wait at most this long to be announced.
            await asyncio.sleep(max(0.0, self.spacing - (loop.time() - sent)))

    async def close(self) -> None:
        """Send what is pending, then close the signal's own connection."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)
        if self._conn is not None and not self._conn.closed:
            await self._conn.close()
        self._conn = None


_signals: weakref.WeakKeyDictionary[AsyncConnectionPool, CommitSignal] = weakref.WeakKeyDictionary()
NOTIFY_CHANNEL = "mc_events"


def commit_signal(pool: AsyncConnectionPool) -> CommitSignal:
    """The :class:`CommitSignal` of ``pool`` (one per pool)."""
    signal = _signals.get(pool)
    if signal is None:
        conninfo = pool.conninfo
        if not isinstance(conninfo, str):  # pools built here always have a URL
            raise TypeError("the commit signal needs a pool opened with a connection string")
        signal = _signals[pool] = CommitSignal(conninfo, NOTIFY_CHANNEL)
    return signal


async def close_pool(pool: AsyncConnectionPool) -> None:
    """Close ``pool`` and the connection its :class:`CommitSignal` holds outside it."""
    signal = _signals.pop(pool, None)
    if signal is not None:
        await signal.close()
    await pool.close()


@asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConn]:
    """A connection inside one transaction; psycopg errors leave as project errors.

    When the transaction appended events, the relay is woken once it has committed.
    """
    try:
        async with pool.connection() as raw:
            conn: AsyncConn = raw  # type: ignore[assignment]
            _managed.add(conn)
            try:
                async with conn.transaction():
                    yield conn
            finally:
                _managed.discard(conn)
                appended = conn in _appended
                _appended.discard(conn)
            # Reached only when the block committed.
            if appended:
                commit_signal(pool).poke()
    except MissionControlError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise translate(exc) from exc
    except Exception as exc:
        if exc.__class__.__name__ == "PoolTimeout":
            raise translate(exc) from exc
        raise
