"""PostgreSQL connection pools and the translation of psycopg errors into project errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from libs.errors import Conflict, MissionControlError, TransientError


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
        return Conflict(str(exc).splitlines()[0])
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.SerializationFailure):
        return TransientError(
            f"database unavailable: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        )
    if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.AdminShutdown):
        return TransientError(str(exc).splitlines()[0])
    if exc.__class__.__name__ == "PoolTimeout":
        return TransientError("database pool exhausted or unreachable")
    return MissionControlError(f"database error: {str(exc).splitlines()[0] if str(exc) else exc!r}")


@asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConn]:
    """A connection inside one transaction; psycopg errors leave as project errors."""
    try:
        async with pool.connection() as conn, conn.transaction():
            yield conn  # type: ignore[misc]
    except MissionControlError:
        raise
    except (psycopg.Error, OSError) as exc:
        raise translate(exc) from exc
    except Exception as exc:
        if exc.__class__.__name__ == "PoolTimeout":
            raise translate(exc) from exc
        raise
