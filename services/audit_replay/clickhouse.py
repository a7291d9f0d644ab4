"""One ClickHouse interface, two drivers: chDB in process (default) and a server over HTTP.

Both run exactly the same SQL. Parameters use ClickHouse's server-side ``{name:Type}``
placeholders, so values are never spliced into SQL text. Results come back as plain dicts whose
values are JSON-ready and identical for both drivers: integers as ``int``, ``DateTime64`` as
``"YYYY-MM-DD HH:MM:SS.ffffff"`` (UTC), decimals as strings, ``NULL`` as ``None``.

Driver exceptions never leave this module: connection problems become
:class:`~libs.errors.TransientError`, everything else :class:`~libs.errors.MissionControlError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

import orjson

from libs.errors import MissionControlError, TransientError
from libs.settings import Settings

T = TypeVar("T")

# Decimals as strings (a float would lose cents on large sums); times written in any ISO form.
_CHDB_SETTINGS = (
    "SET output_format_json_quote_decimals = 1",
    "SET date_time_input_format = 'best_effort'",
)


class Clickhouse(Protocol):
    """What the audit service needs from ClickHouse."""

    async def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing (DDL, ``INSERT ... SELECT``)."""

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a ``SELECT`` and return its rows as dicts."""

    async def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert ``rows`` (dicts keyed by column) into ``table`` as one batch."""

    async def close(self) -> None:
        """Release the connection or session."""


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Plain notation: ClickHouse does not read "1E-10" into a Decimal column.
        return format(value, "f")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _chdb_literal(value: Any) -> str:
    """A parameter value in the text form ClickHouse parses for ``{name:Type}``."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_quote(v) for v in value) + "]"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _quote(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_quote(v) for v in value) + ")"
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _plain(value: Any) -> Any:
    """A server-driver value in the same JSON-ready form chDB's JSON output has."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _translate(exc: BaseException, what: str) -> MissionControlError:
    if isinstance(exc, MissionControlError):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else repr(exc)
    lowered = text.lower()
    if isinstance(exc, ConnectionError | TimeoutError | OSError) or any(
        marker in lowered
        for marker in ("connection", "timed out", "timeout", "unavailable", "too many simultaneous")
    ):
        return TransientError(f"clickhouse unavailable during {what}: {text}")
    return MissionControlError(f"clickhouse {what} failed: {text}")


class ChdbClickhouse:
    """ClickHouse embedded in this process (chDB), with its data under ``path``.

    chDB calls block and a session is not safe for concurrent use, so every call runs on one
    dedicated worker thread: the event loop stays free and calls are serialised.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        self._session: Any = None

    def _open(self) -> Any:
        if self._session is None:
            from chdb import session

            self.path.mkdir(parents=True, exist_ok=True)
            s = session.Session(str(self.path))  # type: ignore[no-untyped-call]
            for stmt in _CHDB_SETTINGS:
                s.query(stmt)  # type: ignore[no-untyped-call]
            self._session = s
        return self._session

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except Exception as exc:
            raise _translate(exc, what) from exc

    async def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""
        p = {k: _chdb_literal(v) for k, v in (params or {}).items()}

        def call() -> None:
            s = self._open()
            if p:
                s.query(sql, "CSV", params=p)
            else:
                s.query(sql)

        await self._run("command", call)

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a ``SELECT``; rows as dicts."""
        p = {k: _chdb_literal(v) for k, v in (params or {}).items()}

        def call() -> list[dict[str, Any]]:
            res = self._open().query(sql, "JSONEachRow", params=p)
            data = res.bytes()
            return [orjson.loads(line) for line in data.splitlines() if line]

        return await self._run("query", call)

    async def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """One ``INSERT ... FORMAT JSONEachRow`` for all ``rows`` (batched: ~300x single rows)."""
        if not rows:
            return
        cols = list(columns)
        body = b"\n".join(
            orjson.dumps({c: r.get(c) for c in cols}, default=_json_default) for r in rows
        )
        sql = f"INSERT INTO {table} ({', '.join(cols)}) FORMAT JSONEachRow\n" + body.decode()

        def call() -> None:
            self._open().query(sql)

        await self._run(f"insert into {table}", call)

    async def close(self) -> None:
        """Close the session and stop the worker thread."""

        def call() -> None:
            if self._session is not None:
                with contextlib.suppress(Exception):
                    self._session.close()
                self._session = None

        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._executor.shutdown(wait=False)


class ServerClickhouse:
    """A ClickHouse server reached with clickhouse-connect (``CLICKHOUSE_URL``).

    The synchronous client runs on a small thread pool (its async client needs aiohttp, which
    this project does not depend on); sessions are off so concurrent calls do not collide.
    """

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        self._client: Any = None
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clickhouse")

    def _get(self) -> Any:
        if self._client is None:
            import clickhouse_connect

            self._client = clickhouse_connect.get_client(
                dsn=self.url, autogenerate_session_id=False
            )
        return self._client

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except Exception as exc:
            raise _translate(exc, what) from exc

    async def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""
        p = dict(params or {})
        await self._run("command", lambda: self._get().command(sql, parameters=p))

    async def query(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a ``SELECT``; rows as dicts in the same form as chDB's."""
        p = dict(params or {})

        def call() -> list[dict[str, Any]]:
            result = self._get().query(sql, parameters=p)
            return [{k: _plain(v) for k, v in row.items()} for row in result.named_results()]

        return await self._run("query", call)

    async def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """One batched insert of ``rows``."""
        if not rows:
            return
        cols = list(columns)
        data = [[r.get(c) for c in cols] for r in rows]
        await self._run(
            f"insert into {table}", lambda: self._get().insert(table, data, column_names=cols)
        )

    async def close(self) -> None:
        """Close the client and stop the worker threads."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        self._executor.shutdown(wait=False)


def open_clickhouse(settings: Settings) -> Clickhouse:
    """The server driver when ``CLICKHOUSE_URL`` is set, else chDB in ``<data_dir>/clickhouse``."""
    if settings.clickhouse_url:
        return ServerClickhouse(settings.clickhouse_url.get_secret_value())
    return ChdbClickhouse(Path(settings.data_dir) / "clickhouse")
