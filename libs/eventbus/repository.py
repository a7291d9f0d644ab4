"""The application layer: one repository per aggregate type, and the envelope for every event.

A handler parses its request, calls :meth:`Repository.execute` with a pure ``decide`` function and
replies. ``execute`` does the rest, the same way for every aggregate:

1. in a unit of work (its own transaction, or the caller's: a consumer's, whose applied-event
   record then commits together with the effect), optionally under a lock per aggregate;
2. loads each aggregate: a cached state is trusted when the aggregate is one stream (the append's
   ``expected_version`` checks it), the others are caught up from their cached versions in one
   read;
3. calls ``decide(state)`` and wraps the events in envelopes (:func:`envelopes_for`: correlation,
   causation, actor, trace context);
4. appends every stream's events with the version it decided on, all in one transaction;
5. on :class:`~libs.errors.ConcurrencyError` tries again with tenacity: a conflict on a state that
   came from the cache only shows the cache was behind (another replica wrote), so everything is
   read fresh and retried at once; conflicts on freshly read states are real races, retried a
   bounded number of times with jitter and then reported as :class:`~libs.errors.Conflict`;
6. moves the cache forward only after the commit, so a cached state is never ahead of the store.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from cachetools import Cache, LRUCache, TTLCache
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from libs.contracts.envelope import DomainEvent, EventEnvelope, TraceContext, stream_id_for
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError, Conflict
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.store import Append, EventStore
from libs.eventbus.uow import UnitOfWork
from libs.eventbus.uow import begin as pg_begin

S = TypeVar("S")

Store = EventStore | InMemoryEventStore
"""The event store port: PostgreSQL, or its in-memory twin in unit tests."""


def begin(store: Store) -> AbstractAsyncContextManager[UnitOfWork]:
    """A unit of work in a new transaction on ``store``."""
    if isinstance(store, InMemoryEventStore):
        return store.begin()
    return pg_begin(store)


# --- envelopes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventMeta:
    """What the envelopes of the events one command causes carry besides the payload.

    ``actor`` may be a function of the aggregate's state (a run's steps are acted by its agent).
    With ``chain_causation`` the second and later events of one decision name the first as their
    cause (a violation is a consequence of the decision recorded just before it).
    """

    correlation_id: str
    actor: str | Callable[[Any], str]
    causation_id: str | None = None
    trace_context: TraceContext = field(default_factory=TraceContext)
    chain_causation: bool = False

    @classmethod
    def caused_by(cls, env: EventEnvelope, actor: str) -> EventMeta:
        """The meta of events a consumer appends in reaction to ``env``."""
        return cls(
            correlation_id=env.correlation_id,
            actor=actor,
            causation_id=str(env.event_id),
            trace_context=env.trace_context,
        )

    def actor_for(self, state: Any) -> str:
        """The actor of events decided on ``state``."""
        return self.actor(state) if callable(self.actor) else self.actor


def envelopes_for(
    events: Sequence[DomainEvent],
    *,
    tenant_id: str,
    stream_id: str,
    meta: EventMeta,
    state: Any = None,
) -> list[EventEnvelope]:
    """Fresh envelopes for ``events`` on ``stream_id``: the one place envelopes are built."""
    actor = meta.actor_for(state)
    out: list[EventEnvelope] = []
    for event in events:
        causation = meta.causation_id
        if meta.chain_causation and out:
            causation = str(out[0].event_id)
        out.append(
            EventEnvelope(
                event_type=event.event_type,
                schema_version=event.schema_version,
                tenant_id=tenant_id,
                stream_id=stream_id,
                correlation_id=meta.correlation_id,
                causation_id=causation,
                actor=actor,
                trace_context=meta.trace_context,
                payload=event.model_dump(mode="json"),
            )
        )
    return out


# --- aggregates ----------------------------------------------------------------------------------


class Recorded(NamedTuple):
    """A typed event with the envelope it was stored in (for ``occurred_at``, ``position``...)."""

    event: DomainEvent
    envelope: EventEnvelope


Fold = Callable[[S, Sequence[Recorded]], S]
Decide = Callable[[S], Sequence[DomainEvent]]
Prepare = Callable[[UnitOfWork], Awaitable[Fold[S] | None]]


def fold_with(evolve: Callable[[S, DomainEvent], S]) -> Fold[S]:
    """A fold that applies ``evolve(state, event)`` to each event in turn."""

    def fold(state: S, recorded: Sequence[Recorded]) -> S:
        for r in recorded:
            state = evolve(state, r.event)
        return state

    return fold


def fold_with_time(evolve: Callable[[S, DomainEvent, datetime], S]) -> Fold[S]:
    """A fold that applies ``evolve(state, event, occurred_at)`` to each event in turn, for
    states that keep when something happened (an expiry, an opening)."""

    def fold(state: S, recorded: Sequence[Recorded]) -> S:
        for r in recorded:
            state = evolve(state, r.event, r.envelope.occurred_at)
        return state

    return fold


@dataclass(frozen=True)
class Aggregate(Generic[S]):
    """An aggregate type: where its events live, its initial state and its fold.

    ``streams(tenant, id)`` defaults to ``(<tenant>/<category>/<id>,)``. An aggregate may be
    folded from several streams (merged in store order); decisions are appended to the first.
    ``lock_key(tenant, id)``, when set, names a lock every ``execute`` on that aggregate takes
    first, so commands on one aggregate are decided one at a time across replicas.
    """

    category: str
    initial: Callable[[str, str], S]
    fold: Fold[S]
    streams: Callable[[str, str], tuple[str, ...]] | None = None
    lock_key: Callable[[str, str], str] | None = None

    def stream_ids(self, tenant_id: str, entity_id: str) -> tuple[str, ...]:
        """The streams the aggregate is folded from; the first is the one it appends to."""
        if self.streams is not None:
            return self.streams(tenant_id, entity_id)
        return (stream_id_for(tenant_id, self.category, entity_id),)


@dataclass(frozen=True)
class Snapshot(Generic[S]):
    """A folded state and the version of each of its streams it reflects."""

    state: S
    versions: tuple[int, ...]

    @property
    def exists(self) -> bool:
        """Whether any event has been folded in."""
        return any(self.versions)


@dataclass(frozen=True)
class Executed(Generic[S]):
    """What :meth:`Repository.execute` did: stored envelopes (append order), states, events."""

    stored: list[EventEnvelope]
    states: dict[str, S]
    events: dict[str, list[DomainEvent]]


class _Stale(Exception):
    """A decision taken on an unverified (cached) state must be taken again on a fresh one."""


def _decode(envs: Sequence[EventEnvelope]) -> list[Recorded]:
    return [Recorded(decode(e), e) for e in envs]


class Repository(Generic[S]):
    """Loads, caches and changes aggregates of one type (see the module docstring).

    ``max_retries``: how many times a genuine concurrent conflict is retried before the caller
    gets :class:`~libs.errors.Conflict`. ``cache_size`` entries are kept (LRU), each for at most
    ``ttl`` seconds when given.
    """

    def __init__(
        self,
        store: Store,
        aggregate: Aggregate[S],
        *,
        cache_size: int = 10_000,
        ttl: float | None = None,
        max_retries: int = 3,
        max_jitter_s: float = 0.004,
    ) -> None:
        self.store = store
        self.aggregate = aggregate
        self.max_retries = max_retries
        self.max_jitter_s = max_jitter_s
        self._cache: Cache[tuple[str, str], Snapshot[S]] = (
            TTLCache(cache_size, ttl) if ttl is not None else LRUCache(cache_size)
        )

    # --- reading ---------------------------------------------------------------------------------

    def cached(self, tenant_id: str, entity_id: str) -> S | None:
        """The cached state, if any (it may be behind the store, never ahead)."""
        snap = self._cache.get((tenant_id, entity_id))
        return snap.state if snap is not None else None

    async def load(
        self,
        tenant_id: str,
        entity_id: str,
        *,
        uow: UnitOfWork | None = None,
        fold: Fold[S] | None = None,
    ) -> S:
        """The current state: the cached one caught up with the store in one read."""
        return (await self.load_snapshot(tenant_id, entity_id, uow=uow, fold=fold)).state

    async def load_snapshot(
        self,
        tenant_id: str,
        entity_id: str,
        *,
        uow: UnitOfWork | None = None,
        fold: Fold[S] | None = None,
    ) -> Snapshot[S]:
        """Like :meth:`load`, with the stream versions the state reflects."""
        if uow is None:
            async with begin(self.store) as own:
                return await self.load_snapshot(tenant_id, entity_id, uow=own, fold=fold)
        read = await self._catch_up(uow, tenant_id, [entity_id], fold)
        return read[entity_id]

    async def _catch_up(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        entity_ids: Sequence[str],
        fold: Fold[S] | None,
    ) -> dict[str, Snapshot[S]]:
        """Each aggregate's cached snapshot plus what was stored after it, in one read."""
        fold = fold or self.aggregate.fold
        start: dict[str, Snapshot[S]] = {}
        ranges: list[tuple[str, int]] = []
        for eid in entity_ids:
            snap = self._cache.get((tenant_id, eid)) or self._empty(tenant_id, eid)
            start[eid] = snap
            for sid, version in zip(
                self.aggregate.stream_ids(tenant_id, eid), snap.versions, strict=True
            ):
                ranges.append((sid, version + 1))
        newer = await uow.read_streams(ranges)
        out: dict[str, Snapshot[S]] = {}
        for eid, snap in start.items():
            sids = self.aggregate.stream_ids(tenant_id, eid)
            per_stream = [newer.get(sid, []) for sid in sids]
            if any(per_stream):
                merged = [e for events in per_stream for e in events]
                if len(sids) > 1:
                    merged.sort(key=lambda e: e.position or 0)
                versions = tuple(
                    events[-1].stream_version if events else v
                    for events, v in zip(per_stream, snap.versions, strict=True)
                )
                snap = Snapshot(fold(snap.state, _decode(merged)), versions)
                if any(uow.wrote(sid) for sid in sids):
                    # The read saw this transaction's own writes: not stored until it commits.
                    self._remember_after_commit(uow, tenant_id, eid, snap)
                else:
                    # Everything read was committed by others, so the cache stays behind.
                    self._remember((tenant_id, eid), snap)
            out[eid] = snap
        return out

    def _empty(self, tenant_id: str, entity_id: str) -> Snapshot[S]:
        n = len(self.aggregate.stream_ids(tenant_id, entity_id))
        return Snapshot(self.aggregate.initial(tenant_id, entity_id), (0,) * n)

    # --- the cache -------------------------------------------------------------------------------

    def _remember(self, key: tuple[str, str], snap: Snapshot[S]) -> None:
        """Cache ``snap`` unless a newer one is cached (or nothing was ever stored)."""
        if not snap.exists:
            return
        known = self._cache.get(key)
        if known is not None and all(
            k >= v for k, v in zip(known.versions, snap.versions, strict=True)
        ):
            return
        self._cache[key] = snap

    def _remember_after_commit(
        self, uow: UnitOfWork, tenant_id: str, entity_id: str, snap: Snapshot[S]
    ) -> None:
        uow.after_commit(lambda: self._remember((tenant_id, entity_id), snap))

    # --- changing --------------------------------------------------------------------------------

    async def execute(
        self,
        tenant_id: str,
        entity_id: str,
        decide: Decide[S],
        meta: EventMeta,
        *,
        uow: UnitOfWork | None = None,
        fold: Fold[S] | None = None,
        prepare: Prepare[S] | None = None,
    ) -> tuple[S, list[EventEnvelope]]:
        """Decide on one aggregate and append what it decided; ``(new state, stored)``."""
        out = await self.execute_many(
            tenant_id, {entity_id: decide}, meta, uow=uow, fold=fold, prepare=prepare
        )
        return out.states[entity_id], out.stored

    async def execute_many(
        self,
        tenant_id: str,
        commands: Mapping[str, Decide[S]],
        meta: EventMeta,
        *,
        uow: UnitOfWork | None = None,
        fold: Fold[S] | None = None,
        prepare: Prepare[S] | None = None,
    ) -> Executed[S]:
        """Decide on several aggregates and append everything in one transaction (all or none).

        In the caller's ``uow`` each attempt runs in a savepoint, so a conflict leaves the
        caller's transaction usable; without one each attempt is a transaction of its own.
        ``fold`` replaces the aggregate's fold for this call; ``prepare(uow)`` runs first in
        every attempt (after the aggregate's lock) to read what ``decide`` needs besides the
        aggregate, in the same transaction, and may return the fold to use.
        """
        fold = fold or self.aggregate.fold
        state = {"refresh": False, "conflicts": 0}

        def stop(_: RetryCallState) -> bool:
            return state["conflicts"] > self.max_retries

        def wait(_: RetryCallState) -> float:
            # Jitter, so writers that collided do not collide again in lockstep. A stale cache
            # is no collision: it is retried at once.
            return random.uniform(0, self.max_jitter_s * state["conflicts"])

        retrying = AsyncRetrying(
            retry=retry_if_exception_type((ConcurrencyError, _Stale)),
            stop=stop,
            wait=wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    fresh: set[str] = set()
                    try:
                        async with self._unit(uow) as work:
                            return await self._attempt(
                                work,
                                tenant_id,
                                commands,
                                meta,
                                fold,
                                prepare,
                                bool(state["refresh"]),
                                fresh,
                            )
                    except ConcurrencyError as exc:
                        if not any(
                            exc.stream_id in self.aggregate.stream_ids(tenant_id, eid)
                            for eid in fresh
                        ):
                            # Only the cache was behind. Bounded: from now on every state is
                            # read fresh, so any further conflict is a real one.
                            state["refresh"] = True
                            raise _Stale() from exc
                        state["refresh"] = True
                        state["conflicts"] += 1
                        raise
                    except _Stale:
                        state["refresh"] = True
                        raise
        except ConcurrencyError as exc:
            raise Conflict(
                f"{exc.stream_id} kept changing concurrently; "
                f"gave up after {state['conflicts']} conflicting attempts"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unit(self, uow: UnitOfWork | None) -> AbstractAsyncContextManager[UnitOfWork]:
        if uow is None:
            return begin(self.store)
        return _in_savepoint(uow)

    async def _attempt(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        commands: Mapping[str, Decide[S]],
        meta: EventMeta,
        fold: Fold[S],
        prepare: Prepare[S] | None,
        refresh: bool,
        fresh: set[str],
    ) -> Executed[S]:
        agg = self.aggregate
        if agg.lock_key is not None:
            # In a fixed order, so two batches locking the same aggregates cannot deadlock.
            for eid in sorted(commands):
                await uow.lock(agg.lock_key(tenant_id, eid))
        if prepare is not None:
            fold = await prepare(uow) or fold
        single = len(agg.stream_ids(tenant_id, next(iter(commands)))) == 1 if commands else True
        snaps: dict[str, Snapshot[S]] = {}
        to_read: list[str] = []
        for eid in commands:
            cached = self._cache.get((tenant_id, eid))
            # One-stream aggregates trust their cache: the append's expected version checks it.
            # Several streams cannot be checked by one append, so they are always caught up.
            if cached is None or refresh or not single:
                to_read.append(eid)
            else:
                snaps[eid] = cached
        if to_read:
            snaps.update(await self._catch_up(uow, tenant_id, to_read, fold))
            fresh.update(to_read)

        appends: list[Append] = []
        decided: dict[str, list[DomainEvent]] = {}
        for eid, decide in commands.items():
            snap = snaps[eid]
            try:
                events = list(decide(snap.state))
            except Exception:
                if eid not in fresh:
                    raise _Stale() from None  # a rejection must be made on the real state
                raise
            if not events:
                if eid not in fresh:
                    raise _Stale()  # so must "nothing to do"
                continue
            decided[eid] = events
            sid = agg.stream_ids(tenant_id, eid)[0]
            envs = envelopes_for(
                events, tenant_id=tenant_id, stream_id=sid, meta=meta, state=snap.state
            )
            appends.append(Append(sid, envs, expected_version=snap.versions[0]))
        stored = await uow.append_many(appends) if appends else []

        by_stream: dict[str, list[EventEnvelope]] = {}
        for env in stored:
            by_stream.setdefault(env.stream_id, []).append(env)
        states: dict[str, S] = {}
        for eid, snap in snaps.items():
            mine = decided.get(eid)
            if mine:
                envs = by_stream[agg.stream_ids(tenant_id, eid)[0]]
                snap = Snapshot(
                    fold(snap.state, [Recorded(e, env) for e, env in zip(mine, envs, strict=True)]),
                    (envs[-1].stream_version, *snap.versions[1:]),
                )
                # Not before the commit: a rolled-back append must leave the cache behind (and
                # behind is all the cache ever is until then).
                self._remember_after_commit(uow, tenant_id, eid, snap)
            states[eid] = snap.state
        return Executed(stored=stored, states=states, events=decided)


@asynccontextmanager
async def _in_savepoint(uow: UnitOfWork) -> AsyncIterator[UnitOfWork]:
    async with uow.savepoint():
        yield uow
