"""Audit search without ClickHouse: parameters, the SQL they build, the cursor and the page."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from libs.errors import InvalidInput
from services.audit_replay.clickhouse import TENANT, scoped_sql, tenant_filter
from services.audit_replay.domain.search import (
    ID_FILTERS,
    MAX_SEARCH_LIMIT,
    Cursor,
    decode_cursor,
    encode_cursor,
    page,
    parse_search,
    search_sql,
    tokens_of,
)

pytestmark = pytest.mark.unit


def test_a_cursor_round_trips_and_is_opaque_text() -> None:
    c = Cursor("2026-01-02 03:04:05.000006", "01a2-e")
    text = encode_cursor(c)
    assert decode_cursor(text) == c
    assert "2026" not in text and "=" not in text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64 !",
        base64.urlsafe_b64encode(b"{}").decode(),
        base64.urlsafe_b64encode(b'["2026-01-02", "e"]').decode(),
        base64.urlsafe_b64encode(b'["2026-13-02 03:04:05.000006", "e"]').decode(),
        base64.urlsafe_b64encode(b'["2026-01-02 03:04:05.000006", ""]').decode(),
        base64.urlsafe_b64encode(b'["2026-01-02 03:04:05.000006", 7]').decode(),
        "x" * 401,
    ],
)
def test_a_bad_cursor_is_refused_naming_the_cursor(bad: str) -> None:
    with pytest.raises(InvalidInput, match="cursor"):
        parse_search("acme", {"cursor": bad})


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"outcome": "maybe"}, "outcome"),
        ({"limit": 0}, "limit"),
        ({"limit": MAX_SEARCH_LIMIT + 1}, "limit"),
        ({"limit": True}, "limit"),
        ({"run_id": ""}, "run_id"),
        ({"agent_id": 5}, "agent_id"),
        ({"policy_id": "x" * 301}, "policy_id"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-01-01T00:00:00"}, "until"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ({"until": "9999-12-31T23:00:00-05:00"}, "until"),
        ({"q": "--- !!"}, "q"),
        ({"q": "a b c d e f g h i"}, "q"),
        ({"actor": "a\x00b"}, "actor"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(
    params: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidInput, match=named):
        parse_search("acme", params)


def test_full_text_tokens_split_like_clickhouse_has_token() -> None:
    assert tokens_of("Token-budget 500_exceeded, TOKEN café") == (
        "token",
        "budget",
        "500",
        "exceeded",
        "café",
    )


def test_every_filter_is_a_bound_parameter_and_the_tenant_is_marked_per_from() -> None:
    # Each value carries a quote and a word of its own: none may reach the SQL text.
    ids = {name: f"{name}'v" for name in (*ID_FILTERS, "workflow_id", "policy_id")}
    q = parse_search(
        "acme",
        {
            **ids,
            "outcome": "deny",
            "since": "2026-01-01T00:00:00+02:00",
            "until": "2026-01-02T00:00:00Z",
            "q": "Zanzibar exceeded",
            "limit": 10,
            "cursor": encode_cursor(Cursor("2026-01-01 12:00:00.000000", "e9'x")),
        },
    )
    sql, params = search_sql(q)
    for value in (*ids.values(), "deny", "zanzibar", "exceeded", "2026", "e9'x", "acme"):
        assert value not in sql, value
    assert {k: params[k] for k in ids} == ids and params["outcome"] == "deny"
    assert params["t0"] == "zanzibar" and params["t1"] == "exceeded"
    assert (params["since"], params["until"]) == (
        "2025-12-31 22:00:00.000000",
        "2026-01-02 00:00:00.000000",
    )
    assert (params["after_at"], params["after_id"]) == ("2026-01-01 12:00:00.000000", "e9'x")
    assert params["limit"] == 11
    assert "has(policy_ids, {policy_id:String})" in sql
    assert "ORDER BY tenant_id DESC, occurred_at DESC, event_id DESC" in sql
    # The workflow's subqueries read the table too: each FROM has its tenant predicate.
    assert sql.count(TENANT) == sql.count("FROM ") == 3
    assert "acme" not in scoped_sql(tenant_filter("acme"), sql)


def test_times_reach_clickhouse_with_a_four_digit_year() -> None:
    q = parse_search("acme", {"since": "0001-01-01T00:00:00Z", "until": "0999-06-01T12:00:00Z"})
    _, params = search_sql(q)
    assert (params["since"], params["until"]) == (
        "0001-01-01 00:00:00.000000",
        "0999-06-01 12:00:00.000000",
    )


def _row(at: str, event_id: str, **kw: Any) -> dict[str, Any]:
    base = {
        "occurred_at": at,
        "event_id": event_id,
        "position": 1,
        "event_type": "run.started",
        "stream_id": "acme/run/r1",
        "actor": "test",
        "run_id": "r1",
        "agent_id": "",
        "workflow_id": "",
        "execution_id": "",
        "policy_ids": [],
        "outcome": "",
        "incident_id": "",
        "excerpt": "",
    }
    return {**base, **kw}


def test_a_page_drops_unmerged_copies_and_points_past_the_last_row_read() -> None:
    q = parse_search("acme", {"limit": 3})
    rows = [
        _row("2026-01-01 00:00:03.000000", "c"),
        _row("2026-01-01 00:00:03.000000", "c"),
        _row("2026-01-01 00:00:02.000000", "b", outcome="deny", policy_ids=["p"]),
        _row("2026-01-01 00:00:01.000000", "a"),
    ]
    out = page(q, rows)
    assert [e["event_id"] for e in out["events"]] == ["c", "b"]
    assert out["events"][0]["occurred_at"] == "2026-01-01T00:00:03.000000Z"
    assert out["events"][0]["agent_id"] is None and out["events"][1]["outcome"] == "deny"
    assert decode_cursor(out["next_cursor"]) == Cursor("2026-01-01 00:00:02.000000", "b")
    last = page(q, rows[2:])
    assert last["next_cursor"] is None and len(last["events"]) == 2
