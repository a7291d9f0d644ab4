"""Answers of audit-replay's projection reads, kept while the projections have not moved.

Embedded chDB runs one statement at a time per process, so four people opening the same console
panel queue four identical aggregations behind each other. :class:`AnswerCache` keeps each
answer per ``(tenant, method, parameters)`` and serves it again while it is still the answer the
projections would give:

* **Every** answer is computed again at the latest ``max_age`` (60 s) after its computation
  began, since some depend on the clock as well as the data (a window ending now).
* **Exact** reads (listings a person acts on: runs, incidents, policies) are served from the
  cache only while the projections' *data version* is the one read when the answer was computed
  (the projector moves it with every write to the tables, see
  :attr:`services.audit_replay.handlers.Projector.data_version`). The version is taken before the
  computation starts, so an answer that may have missed a write is never kept under the version
  that write produced: once a lane's flush is done, the next answer includes it.
* **Relaxed** reads (aggregates over weeks of costs and decisions: analytics, statements, costs)
  are also served for up to ``max_staleness`` seconds after the computation started, even if the
  projections moved since, but never across a rebuild (the version's *epoch*). Under load the
  lanes flush every second or faster, so without this an aggregate would be recomputed for nearly
  every request; with it, each is computed at most about once per ``max_staleness`` per tenant
  and parameters, and is never older than that.

**Single flight.** A request that finds no usable answer but finds the same one being computed
(under the same rules: same version, or relaxed and recent enough) waits for that computation
instead of queueing its own statement. The computation runs as a task of its own, so a waiter
that gives up (its caller's deadline) does not cancel it for the others.

**Bounds and errors.** At most ``max_entries`` answers and ``max_bytes`` bytes are kept (least
recently used go first); an answer larger than ``max_bytes`` is answered but not kept. An error
is handed to every request waiting for that computation and never kept: the next request
computes again.

The key names the tenant, so no tenant is ever served another's answer; the class itself knows
nothing of ClickHouse or the bus (the clock and the version source are injected), and
``services/audit_replay/entrypoints.py`` wires it to the read handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

V = TypeVar("V")

AnswerKey = tuple[str, str, str]
"""``(tenant, method, canonical parameters)``."""
DataVersion = tuple[int, int]
"""``(epoch, writes)``: what the projections hold changes whenever this changes; a relaxed
answer is never served in another epoch (a rebuild starts one)."""

DEFAULT_MAX_ENTRIES = 2048
DEFAULT_MAX_AGE_S = 60.0
"""No answer is served longer than this after its computation began, however still the data:
answers that depend on the clock (the last N days, this month) then follow it within a minute."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def answer_key(tenant: str, method: str, params: Mapping[str, Any]) -> AnswerKey:
    """The key of ``method``'s answer to ``params`` for ``tenant``: the parameters as JSON with
    sorted keys (so their order does not matter), the tenant apart from them."""
    rest = {k: v for k, v in params.items() if k != "tenant_id"}
    return (tenant, method, orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode())


@dataclass
class _Entry(Generic[V]):
    version: DataVersion
    started: float
    value: V
    size: int


@dataclass
class _Flight:
    version: DataVersion
    started: float
    task: asyncio.Task[Any]


@dataclass
class AnswerStats:
    """What the cache did: answers served from it, shared with a computation under way, and
    computed."""

    hits: int = 0
    shared: int = 0
    computed: int = 0


class AnswerCache(Generic[V]):
    """Answers per key, valid while ``version()`` has not moved (see the module docstring).

    ``version`` returns the projections' :data:`DataVersion`; ``size`` the bytes an answer
    holds; ``clock`` seconds (monotonic).
    """

    def __init__(
        self,
        version: Callable[[], DataVersion],
        *,
        size: Callable[[V], int],
        max_staleness: float = 1.0,
        max_age: float = DEFAULT_MAX_AGE_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_staleness < 0 or max_age <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError(
                "max_staleness >= 0, max_age > 0, max_entries >= 1 and max_bytes >= 1 are needed"
            )
        self._version = version
        self._size = size
        self.max_staleness = max_staleness
        self.max_age = max_age
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[AnswerKey, _Entry[V]] = OrderedDict()
        self._flights: dict[AnswerKey, _Flight] = {}
        self._bytes = 0
        self.stats = AnswerStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The bytes of the answers kept."""
        return self._bytes

    def _usable(self, version: DataVersion, started: float, relaxed: bool, now: float) -> bool:
        if now - started > self.max_age:
            # Some answers depend on the clock as well as the data (a window ending now, this
            # month's statement): on a quiet tenant nothing moves the version at midnight.
            return False
        current = self._version()
        if version == current:
            return True
        fresh = self.max_staleness > 0 and now - started <= self.max_staleness
        return relaxed and fresh and version[0] == current[0]

    async def get(
        self, key: AnswerKey, compute: Callable[[], Awaitable[V]], *, relaxed: bool = False
    ) -> V:
        """The answer of ``key``: kept, being computed, or computed now by ``compute``.

        ``relaxed`` allows an answer up to ``max_staleness`` seconds old although the projections
        moved since. ``compute``'s error is raised to every caller sharing it and not kept.
        """
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if self._usable(entry.version, entry.started, relaxed, now):
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry.value
            self._drop(key)
        flight = self._flights.get(key)
        if flight is not None and self._usable(flight.version, flight.started, relaxed, now):
            self.stats.shared += 1
        else:
            flight = self._start(key, compute, relaxed, now)
        # Shielded: a caller that gives up does not cancel the computation the others wait for.
        result: V = await asyncio.shield(flight.task)
        return result

    def _start(
        self, key: AnswerKey, compute: Callable[[], Awaitable[V]], relaxed: bool, now: float
    ) -> _Flight:
        # The version before the computation reads anything: a write that lands while it runs
        # moves the version away from this answer.
        version = self._version()
        self.stats.computed += 1

        async def run() -> V:
            return await compute()

        task = asyncio.ensure_future(run())
        flight = _Flight(version, now, task)
        self._flights[key] = flight

        def done(t: asyncio.Task[Any]) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if t.cancelled() or t.exception() is not None:
                return  # errors are never kept (and are retrieved here, so never "unhandled")
            # Kept only if it can still be served (a relaxed answer for a while, an exact one
            # while nothing was written since it started), and not over a later one.
            current = self._version()
            later = self._entries.get(key)
            if later is not None and later.started > now:
                return
            if version == current or (relaxed and version[0] == current[0]):
                self._keep(key, _Entry(version, now, t.result(), 0))

        task.add_done_callback(done)
        return flight

    def _keep(self, key: AnswerKey, entry: _Entry[V]) -> None:
        entry.size = self._size(entry.value)
        if entry.size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = entry
        self._bytes += entry.size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: AnswerKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
