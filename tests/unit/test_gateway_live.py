"""The SSE streams' pure parts: the Last-Event-ID cursor, the bounds on open streams, which
events belong to a run or an execution and which end it, and the message format."""

from __future__ import annotations

import pytest

from libs import errors
from libs.contracts.subjects import live_filter, live_subject
from services.gateway.live import Cursor, StreamSlots, Target, TooManyStreams, sse

pytestmark = pytest.mark.unit


def test_the_cursor_round_trips_and_anything_else_is_named() -> None:
    assert Cursor.parse("1042-17") == Cursor(1042, 17)
    assert str(Cursor(1042, 17)) == "1042-17"
    assert Cursor(5, 9) < Cursor(6, 0) < Cursor(6, 1)  # later in either stream sorts later
    for bad in ("", "x", "1-", "-1", "1-2-3", "1 2", "99999999999999999999-1"):
        with pytest.raises(errors.InvalidInput, match="Last-Event-ID"):
            Cursor.parse(bad)


def test_streams_are_bounded_per_tenant_with_429_and_per_process_with_503() -> None:
    slots = StreamSlots(total=3, per_tenant=2)
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(TooManyStreams, match="tenant a has 2 event streams open") as over:
        slots.acquire("a")
    assert over.value.http_status == 429
    slots.acquire("b")
    with pytest.raises(errors.TransientError, match="serves 3 event streams") as full:
        slots.acquire("c")
    assert full.value.http_status == 503
    slots.release("a")
    slots.acquire("c")
    for t in ("a", "b", "c"):
        slots.release(t)
    assert slots.open == {}


def _env(stream_id: str, kind: str = "run.step_recorded", **payload: object) -> dict[str, object]:
    return {"tenant_id": "acme", "stream_id": stream_id, "event_type": kind, "payload": payload}


def test_what_belongs_to_a_run_and_what_ends_it() -> None:
    run = Target("acme", "run", "r.1")
    assert run.belongs(_env("acme/run/r.1"))
    assert run.belongs(_env("acme/cost/x", "cost.recorded", run_id="r.1"))
    assert not run.belongs(_env("acme/run/r.2"))
    assert not run.belongs({**_env("acme/run/r.1"), "tenant_id": "evil"})
    assert run.ends(_env("acme/run/r.1", "run.completed"))
    assert run.ends(_env("acme/run/r.1", "run.stopped_by_policy"))
    assert not run.ends(_env("acme/run/r.2", "run.completed"))
    assert run.ended({"status": "failed"}) and not run.ended({"status": "running"})
    assert run.live_filter() == "mc.live.acme.*.r%2E1"


def test_what_belongs_to_an_execution_and_what_ends_it() -> None:
    ex = Target("acme", "execution", "e1")
    assert ex.belongs(_env("acme/execution/e1", "execution.step_dispatched"))
    assert ex.belongs(_env("acme/run/e1:s:1"))
    assert ex.belongs(_env("acme/cost/x", "cost.recorded", run_id="e1:s:2"))
    assert not ex.belongs(_env("acme/run/e10:s:1"))  # another execution's attempt
    assert not ex.belongs(_env("acme/execution/e2", "execution.completed"))
    for kind in ("completed", "failed", "aborted", "budget_exceeded"):
        assert ex.ends(_env("acme/execution/e1", f"execution.{kind}"))
    assert not ex.ends(_env("acme/execution/e1", "execution.step_stopped"))
    assert ex.ended({"status": "aborted"}) and not ex.ended({"status": "pending"})
    assert set(ex.event_filters()) == {
        "mc.evt.acme.run.>", "mc.evt.acme.cost.recorded", "mc.evt.acme.execution.>",
    }  # fmt: skip


def test_live_subjects_match_the_filters_of_their_run_and_execution() -> None:
    subject = live_subject("acme", "e1", "e1:s:1")
    assert subject == "mc.live.acme.e1.e1:s:1"
    assert live_filter("acme", execution_id="e1") == "mc.live.acme.e1.*"
    assert live_subject("acme", None, "free.run") == "mc.live.acme._.free%2Erun"


def test_a_message_is_id_event_and_one_line_of_json() -> None:
    text = sse("usage", {"a": "x\ny"}, Cursor(3, 4))
    assert text == 'id: 3-4\nevent: usage\ndata: {"a":"x\\ny"}\n\n'
    assert sse("end", {}, None) == "event: end\ndata: {}\n\n"
