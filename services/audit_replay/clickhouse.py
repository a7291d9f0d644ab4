"""The one ClickHouse client of the audit service: clickhouse-connect, embedded or server.

``CLICKHOUSE_URL`` names a server (``http://user:pass@host:8123/``); without it the projections
live in chDB inside this process, reached through the same client with a ``chdb:///<path>`` DSN
(chDB ships a clickhouse-connect backend). One code path runs exactly the same SQL on both.

Parameters use ClickHouse's server-side ``{name:Type}`` placeholders, so values are never spliced
into SQL text. Results come back as plain dicts whose values are JSON-ready: integers as ``int``,
``DateTime64`` as ``"YYYY-MM-DD HH:MM:SS.ffffff"`` (UTC), decimals as strings, ``NULL`` as
``None``. Rows are inserted as ``JSONEachRow`` text that ClickHouse parses: serialising with orjson
and letting the server parse is about ten times faster than clickhouse-connect's Python encoding
of the native format.

Driver exceptions never leave this module: connection problems become
:class:`~libs.errors.TransientError`, everything else :class:`~libs.errors.MissionControlError`.

**Tenancy.** Every read of projected rows goes through :meth:`Clickhouse.select`, which takes a
:class:`TenantFilter` that only :func:`tenant_filter` builds: the SQL names where the predicate
goes with :data:`TENANT` (once per ``FROM``), and ``select`` puts the one predicate there with
the tenants as a bound parameter. With a ClickHouse server the same tenants travel as the custom
setting :data:`TENANT_SETTING`, which the row policies created with the schema
(:func:`services.audit_replay.schema.row_policies`) check on every table holding tenant rows, so
a query that lost its predicate still sees one tenant's rows only. chDB has no users and no row
policies: there the predicate is the whole control. The two reads that return no tenant's rows
(the lanes' positions and the schema's migrations) use :meth:`Clickhouse.query_all_tenants`;
``tests/integration/test_audit_tenancy.py`` holds every other read to ``select``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import clickhouse_connect
import orjson

from libs.errors import MissionControlError, TransientError
from libs.settings import Settings
from services.audit_replay.domain.rows import json_default

T = TypeVar("T")

# Times are written in ISO 8601 (orjson's form), which the default parser does not read.
CLIENT_SETTINGS: dict[str, Any] = {"date_time_input_format": "best_effort"}


# Where a query's SQL wants the tenant predicate (one per FROM), and what replaces it.
TENANT = "$tenant"
TENANTS_PARAM = "mc_tenants"
TENANT_PREDICATE = f"tenant_id IN {{{TENANTS_PARAM}:Array(String)}}"
# The custom setting the server's row policies read (custom settings need a prefix the server
# accepts: ``SQL_`` is the default of ``custom_settings_prefixes``).
TENANT_SETTING = "SQL_mc_tenants"
_FROM = re.compile(r"\bFROM\b", re.IGNORECASE)
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class TenantFilter:
    """The tenants one read may see (built by :func:`tenant_filter`)."""

    tenants: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("a tenant filter needs at least one tenant")
        for t in self.tenants:
            if not isinstance(t, str) or not _TENANT_ID.fullmatch(t):
                raise ValueError(f"not a tenant id: {t!r}")

    @property
    def params(self) -> dict[str, Any]:
        """The bound parameter of :data:`TENANT_PREDICATE`."""
        return {TENANTS_PARAM: list(self.tenants)}

    @property
    def settings(self) -> dict[str, Any]:
        """The custom setting the server's row policies check."""
        return {TENANT_SETTING: ",".join(self.tenants)}


def tenant_filter(*tenants: str) -> TenantFilter:
    """The one tenant filter of audit-replay's reads: rows of ``tenants`` and no others.

    Raises :class:`ValueError` for no tenant or a malformed tenant id (a tenant id has a closed
    alphabet, so it can never carry the row policies' separator).
    """
    return TenantFilter(tuple(sorted(set(tenants))))


def scoped_sql(scope: TenantFilter, sql: str) -> str:
    """``sql`` with :data:`TENANT` replaced by the one tenant predicate; refuses SQL that reads
    a table without it (one :data:`TENANT` per ``FROM``)."""
    marks, froms = sql.count(TENANT), len(_FROM.findall(sql))
    if marks == 0 or marks != froms:
        raise ValueError(
            f"every FROM needs its tenant predicate ({TENANT}): {froms} FROM, {marks} {TENANT}"
        )
    return sql.replace(TENANT, TENANT_PREDICATE)


def embedded_dsn(path: Path | str) -> str:
    """The clickhouse-connect DSN of chDB with its data under ``path``."""
    return f"chdb://{Path(path).resolve()}"


def json_each_row(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """``rows`` as ``JSONEachRow`` text holding exactly ``columns``."""
    return b"\n".join(
        orjson.dumps({c: r.get(c) for c in columns}, default=json_default) for r in rows
    )


def _plain(value: Any) -> Any:
    """A driver value in JSON-ready form (see the module docstring)."""
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


class Clickhouse:
    """ClickHouse through clickhouse-connect, for chDB (``chdb:///path``) and servers alike.

    The client is synchronous (its async client needs aiohttp, which this project does not
    depend on), so calls run on worker threads and the event loop stays free. chDB is one engine
    per process that runs one statement at a time, so it gets one thread; a server gets a few,
    with sessions off so concurrent calls do not collide.
    """

    def __init__(self, dsn: str, *, threads: int | None = None) -> None:
        self.dsn = dsn
        self.embedded = dsn.startswith("chdb:")
        self._client: Any = None
        workers = threads or (1 if self.embedded else 4)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clickhouse")

    def _get(self) -> Any:
        if self._client is None:
            if self.embedded:
                Path(self.dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
                self._client = clickhouse_connect.get_client(
                    dsn=self.dsn, settings=dict(CLIENT_SETTINGS)
                )
            else:
                self._client = clickhouse_connect.get_client(
                    dsn=self.dsn, settings=dict(CLIENT_SETTINGS), autogenerate_session_id=False
                )
        return self._client

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except Exception as exc:
            raise _translate(exc, what) from exc

    async def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing (DDL, ``INSERT ... SELECT``)."""
        p = dict(params or {})
        await self._run("command", lambda: self._get().command(sql, parameters=p))

    async def select(
        self, scope: TenantFilter, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a ``SELECT`` of the tenants in ``scope`` (see the module docstring); its rows as
        dicts of JSON-ready values. ``sql`` marks each table's predicate with :data:`TENANT`."""
        p = dict(params or {})
        if TENANTS_PARAM in p:
            raise ValueError(f"{TENANTS_PARAM} is the tenant filter's own parameter")
        p.update(scope.params)
        settings = None if self.embedded else scope.settings
        return await self._select(scoped_sql(scope, sql), p, settings)

    async def query_all_tenants(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a ``SELECT`` that returns no tenant's rows (positions, migrations).

        Only for the reads named in ``tests/integration/test_audit_tenancy.py``; anything that
        returns a tenant's rows goes through :meth:`select`.
        """
        return await self._select(sql, dict(params or {}), None)

    async def _select(
        self, sql: str, params: dict[str, Any], settings: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            result = self._get().query(sql, parameters=params, settings=settings)
            return [{k: _plain(v) for k, v in row.items()} for row in result.named_results()]

        return await self._run("query", call)

    async def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert ``rows`` (dicts keyed by column) into ``table`` as one batch."""
        if rows:
            await self.insert_json(table, columns, json_each_row(columns, rows))

    async def insert_json(
        self,
        table: str,
        columns: Sequence[str] | None,
        body: bytes,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """One ``INSERT ... FORMAT JSONEachRow`` of ``body`` (all columns when ``None``)."""
        if not body:
            return
        cols = None if columns is None else list(columns)
        extra = dict(settings or {})

        def call() -> None:
            self._get().raw_insert(
                table, cols, insert_block=body, fmt="JSONEachRow", settings=extra or None
            )

        await self._run(f"insert into {table}", call)

    async def close(self) -> None:
        """Close the client and stop the worker threads."""

        def call() -> None:
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._executor.shutdown(wait=False)


def open_clickhouse(settings: Settings) -> Clickhouse:
    """The server at ``CLICKHOUSE_URL`` when set, else chDB in ``<data_dir>/clickhouse``."""
    if settings.clickhouse_url:
        return Clickhouse(settings.clickhouse_url.get_secret_value())
    return Clickhouse(embedded_dsn(Path(settings.data_dir) / "clickhouse"))
