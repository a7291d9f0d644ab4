"""audit-replay's answer cache: kept while the projections have not moved, a bounded staleness
for aggregates, one computation shared by identical requests, tenants apart, errors never kept,
memory bounded (services/audit_replay/answers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from services.audit_replay.answers import AnswerCache, answer_key

pytestmark = pytest.mark.unit

KEY = answer_key("acme", "analytics", {"view": "cost_by_model_day", "days": 30})


@dataclass
class World:
    """The injected clock and data version, and a count of computations per answer."""

    now: float = 100.0
    epoch: int = 0
    version: int = 1
    computed: list[str] = field(default_factory=list)

    def cache(self, **kw: float) -> AnswerCache[str]:
        return AnswerCache(
            lambda: (self.epoch, self.version),
            size=len,
            clock=lambda: self.now,
            **kw,  # type: ignore[arg-type]
        )

    def answer(self, value: str) -> Callable[[], Awaitable[str]]:
        async def compute() -> str:
            self.computed.append(value)
            return value

        return compute


class Held:
    """A computation that waits for :meth:`release` (a statement still running)."""

    def __init__(self, value: str = "", error: Exception | None = None) -> None:
        self.value, self.error = value, error
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value

    def release(self) -> None:
        self.gate.set()


async def test_an_answer_is_kept_while_the_projections_do_not_move() -> None:
    w = World()
    cache = w.cache()
    assert await cache.get(KEY, w.answer("first")) == "first"
    w.now += 59  # time alone does not end an exact answer within its maximum age
    assert await cache.get(KEY, w.answer("second")) == "first"
    assert w.computed == ["first"]
    assert (cache.stats.hits, cache.stats.computed) == (1, 1)


async def test_an_answer_is_computed_again_after_its_maximum_age_although_nothing_moved() -> None:
    """An answer over "the last 30 days" depends on the clock: a quiet tenant whose projections
    do not move over midnight must still get tomorrow's window."""
    w = World()
    cache = w.cache(max_age=60.0)
    assert await cache.get(KEY, w.answer("today")) == "today"
    w.now += 60.5
    assert await cache.get(KEY, w.answer("tomorrow")) == "tomorrow"
    assert w.computed == ["today", "tomorrow"]


async def test_a_write_to_the_projections_ends_an_exact_answer_at_once() -> None:
    w = World()
    cache = w.cache(max_staleness=10.0)
    await cache.get(KEY, w.answer("before"))
    w.version += 1
    assert await cache.get(KEY, w.answer("after")) == "after"
    assert await cache.get(KEY, w.answer("again")) == "after"
    assert w.computed == ["before", "after"]


async def test_a_relaxed_answer_outlives_a_write_by_at_most_the_staleness_bound() -> None:
    w = World()
    cache = w.cache(max_staleness=1.0)
    await cache.get(KEY, w.answer("before"), relaxed=True)
    w.version += 1
    w.now += 1.0
    assert await cache.get(KEY, w.answer("within"), relaxed=True) == "before"
    w.now += 0.001
    assert await cache.get(KEY, w.answer("after"), relaxed=True) == "after"
    # The new answer is valid under the new version, up to its maximum age.
    w.now += 59
    assert await cache.get(KEY, w.answer("later"), relaxed=True) == "after"
    assert w.computed == ["before", "after"]


@pytest.mark.parametrize(
    ("max_staleness", "change"),
    [(0.0, "version"), (10.0, "epoch")],
    ids=["no staleness makes relaxed answers exact", "no relaxed answer crosses a rebuild"],
)
async def test_a_relaxed_answer_is_computed_again(max_staleness: float, change: str) -> None:
    w = World()
    cache = w.cache(max_staleness=max_staleness)
    await cache.get(KEY, w.answer("before"), relaxed=True)
    setattr(w, change, getattr(w, change) + 1)
    assert await cache.get(KEY, w.answer("after"), relaxed=True) == "after"


async def test_identical_requests_arriving_together_share_one_computation() -> None:
    cache = World().cache()
    held = Held("shared")
    callers = [asyncio.create_task(cache.get(KEY, held)) for _ in range(5)]
    # The computation starts after every caller has asked (tasks run in the order created).
    await held.started.wait()
    assert (cache.stats.computed, cache.stats.shared) == (1, 4)
    assert not any(c.done() for c in callers)
    held.release()
    assert await asyncio.gather(*callers) == ["shared"] * 5
    assert held.calls == 1


async def test_a_request_after_a_write_does_not_join_a_computation_started_before_it() -> None:
    w = World()
    cache = w.cache(max_staleness=10.0)
    held = Held("old")
    first = asyncio.create_task(cache.get(KEY, held))
    await held.started.wait()
    w.version += 1
    assert await cache.get(KEY, w.answer("new")) == "new"
    held.release()
    assert await first == "old"
    # The answer that started before the write is not kept over the one computed after it.
    assert await cache.get(KEY, w.answer("again")) == "new"
    assert w.computed == ["new"]


async def test_a_slow_relaxed_answer_does_not_replace_a_later_one() -> None:
    w = World()
    cache = w.cache(max_staleness=1.0)
    held = Held("older")
    slow = asyncio.create_task(cache.get(KEY, held, relaxed=True))
    await held.started.wait()
    w.version += 1
    w.now += 2.0  # past the bound: the slow computation is no longer joined
    assert await cache.get(KEY, w.answer("newer"), relaxed=True) == "newer"
    held.release()
    assert await slow == "older"
    w.now += 0.5
    assert await cache.get(KEY, w.answer("unused"), relaxed=True) == "newer"


async def test_an_exact_answer_the_projections_moved_under_is_not_kept() -> None:
    w = World()
    cache = w.cache()

    async def racing() -> str:
        w.version += 1  # a flush lands while the statement runs
        return "maybe stale"

    assert await cache.get(KEY, racing) == "maybe stale"
    assert await cache.get(KEY, w.answer("fresh")) == "fresh"


async def test_a_caller_that_gives_up_does_not_cancel_the_others_computation() -> None:
    w = World()
    cache = w.cache()
    held = Held("done")
    quitter = asyncio.create_task(cache.get(KEY, held))
    stayer = asyncio.create_task(cache.get(KEY, held))
    await held.started.wait()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    held.release()
    assert await stayer == "done"
    assert await cache.get(KEY, w.answer("unused")) == "done"
    assert held.calls == 1 and w.computed == []


async def test_tenants_never_see_each_others_answers() -> None:
    w = World()
    cache = w.cache()
    params = {"view": "productivity", "days": 7}
    acme = answer_key("acme", "analytics", {**params, "tenant_id": "acme"})
    globex = answer_key("globex", "analytics", {**params, "tenant_id": "globex"})
    assert acme != globex
    assert await cache.get(acme, w.answer("acme's")) == "acme's"
    assert await cache.get(globex, w.answer("globex's")) == "globex's"
    assert await cache.get(acme, w.answer("x")) == "acme's"
    assert await cache.get(globex, w.answer("y")) == "globex's"
    # Not even while both are being computed at once.
    w.version += 1
    held_acme, held_globex = Held("acme's new"), Held("globex's new")
    a = asyncio.create_task(cache.get(acme, held_acme))
    g = asyncio.create_task(cache.get(globex, held_globex))
    await held_acme.started.wait()
    await held_globex.started.wait()
    held_acme.release()
    held_globex.release()
    assert (await a, await g) == ("acme's new", "globex's new")
    assert cache.stats.shared == 0


def test_the_key_is_the_tenant_the_method_and_the_parameters_in_any_order() -> None:
    assert answer_key("acme", "costs", {"group_by": "day", "run_id": "r1"}) == answer_key(
        "acme", "costs", {"run_id": "r1", "tenant_id": "acme", "group_by": "day"}
    )
    assert answer_key("acme", "costs", {"group_by": "day"}) != answer_key(
        "acme", "costs", {"group_by": "model"}
    )
    assert answer_key("acme", "runs", {}) != answer_key("acme", "incidents", {})


async def test_an_error_reaches_every_waiter_and_is_never_kept() -> None:
    w = World()
    cache = w.cache()
    held = Held(error=RuntimeError("clickhouse went away"))
    waiters = [asyncio.create_task(cache.get(KEY, held)) for _ in range(3)]
    await held.started.wait()
    held.release()
    for result in await asyncio.gather(*waiters, return_exceptions=True):
        assert isinstance(result, RuntimeError)
    assert held.calls == 1 and len(cache) == 0
    assert await cache.get(KEY, w.answer("recovered")) == "recovered"


async def test_the_least_recently_used_answers_go_first_beyond_the_entry_bound() -> None:
    w = World()
    cache = w.cache(max_entries=2)
    keys = [answer_key("acme", "runs", {"offset": i}) for i in range(3)]
    await cache.get(keys[0], w.answer("a"))
    await cache.get(keys[1], w.answer("b"))
    await cache.get(keys[0], w.answer("unused"))  # used again: keys[1] is now the oldest
    await cache.get(keys[2], w.answer("c"))
    assert len(cache) == 2
    assert await cache.get(keys[0], w.answer("a2")) == "a"
    assert await cache.get(keys[1], w.answer("b2")) == "b2"


async def test_the_bytes_kept_stay_within_the_bound() -> None:
    w = World()
    cache = w.cache(max_bytes=10)
    keys = [answer_key("acme", "runs", {"offset": i}) for i in range(4)]
    await cache.get(keys[0], w.answer("aaaa"))
    await cache.get(keys[1], w.answer("bbbb"))
    await cache.get(keys[2], w.answer("cccc"))
    assert cache.bytes == 8 and len(cache) == 2
    assert await cache.get(keys[0], w.answer("new")) == "new"
    # An answer larger than the whole bound is answered, not kept.
    assert await cache.get(keys[3], w.answer("x" * 11)) == "x" * 11
    assert await cache.get(keys[3], w.answer("small")) == "small"
    assert cache.bytes <= 10


def test_bounds_must_be_positive() -> None:
    for kw in ({"max_staleness": -1.0}, {"max_age": 0.0}, {"max_entries": 0}, {"max_bytes": 0}):
        with pytest.raises(ValueError):
            World().cache(**kw)
