"""Audit search: a search's filters as one SQL query over ``mc.audit_events``, and its cursor.

Pure (no I/O). :func:`parse_search` checks a request's parameters and names the first bad one;
:func:`search_sql` builds the query; :func:`page` turns the rows read into an answer with the
cursor of the next page.

Results are sorted newest first by ``(occurred_at, event_id)``, which is also the table's sorting
key within a tenant, so a page reads in order and stops at its limit. The cursor holds the last
result's sort key (opaque to callers: base64 of JSON), and the next page continues strictly
below it. An event is placed by its own immutable key, so paging never repeats or skips an
event, whatever arrives meanwhile; events that arrive newer than the first page are not in
later pages (they show when the search starts again).

Full text (``q``) matches events whose text (reasons, messages, titles, errors, a step's input
and output, lower-cased) holds every token of ``q``; tokens are what ClickHouse's ``hasToken``
and the table's token bloom filter see: runs of ASCII letters and digits (and any non-ASCII
character), split at every other character.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from libs.errors import InvalidInput

MAX_SEARCH_LIMIT = 200
DEFAULT_SEARCH_LIMIT = 50
MAX_TOKENS = 8
MAX_Q = 200
EXCERPT_CHARS = 500
OUTCOMES = ("allow", "warn", "deny")
# Filters matched against a column of the same name; the workflow filter is wider (see below).
ID_FILTERS = (
    "run_id",
    "agent_id",
    "execution_id",
    "incident_id",
    "actor",
    "event_type",
)
_ID_PARAM_MAX = 300
# hasToken's separators: every ASCII character that is not a letter or a digit.
_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")
RESULT_COLUMNS = (
    "occurred_at, event_id, position, event_type, stream_id, actor, run_id, agent_id, "
    "workflow_id, execution_id, policy_ids, outcome, incident_id, "
    f"substringUTF8(text, 1, {EXCERPT_CHARS}) AS excerpt"
)


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the sort key of its last result."""

    occurred_at: str
    """``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC), as ClickHouse returns a ``DateTime64(6)``."""
    event_id: str


@dataclass(frozen=True)
class SearchQuery:
    """A checked search request."""

    tenant_id: str
    filters: tuple[tuple[str, str], ...] = ()
    """(column, value) pairs of :data:`ID_FILTERS`, plus ``workflow_id``, ``policy_id`` and
    ``outcome``."""
    since: datetime | None = None
    until: datetime | None = None
    tokens: tuple[str, ...] = ()
    limit: int = DEFAULT_SEARCH_LIMIT
    after: Cursor | None = None


def encode_cursor(c: Cursor) -> str:
    """The opaque text form of ``c``."""
    return base64.urlsafe_b64encode(orjson.dumps([c.occurred_at, c.event_id])).decode().rstrip("=")


_CURSOR_TS = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")


def decode_cursor(text: str) -> Cursor:
    """The cursor ``text`` encodes; :class:`InvalidInput` naming ``cursor`` if it is not one."""
    bad = InvalidInput("cursor is not a cursor of an audit search (pass next_cursor unchanged)")
    if not isinstance(text, str) or not text or len(text) > 400:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = orjson.loads(raw)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise bad from None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
        and _CURSOR_TS.fullmatch(value[0])
        and 0 < len(value[1]) <= 100
    ):
        raise bad
    try:
        datetime.fromisoformat(value[0])
    except ValueError:
        raise bad from None
    return Cursor(value[0], value[1])


def tokens_of(q: str) -> tuple[str, ...]:
    """The distinct tokens of a full-text query, lower-cased, in order."""
    seen: dict[str, None] = {}
    for t in _SEPARATORS.split(q.lower()):
        if t:
            seen.setdefault(t, None)
    return tuple(seen)


def _str(p: Mapping[str, Any], name: str, limit: int = _ID_PARAM_MAX) -> str | None:
    v = p.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > limit or "\x00" in v:
        raise InvalidInput(f"{name} must be a non-empty string of at most {limit} characters")
    return v


def _time(p: Mapping[str, Any], name: str) -> datetime | None:
    v = _str(p, name, 64)
    if v is None:
        return None
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 time with a zone") from None
    if t.tzinfo is None:
        raise InvalidInput(f"{name} must be an ISO 8601 time with a zone")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00, before the first UTC time
        raise InvalidInput(f"{name} must be a time between the years 1 and 9999 in UTC") from None


def _ch_time(t: datetime) -> str:
    # As text with a four-digit year: the driver writes a datetime's year 1 as "1-01-01", which
    # ClickHouse refuses.
    return t.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def parse_search(tenant_id: str, p: Mapping[str, Any]) -> SearchQuery:
    """The search ``p`` asks for; :class:`InvalidInput` naming the first bad parameter."""
    filters: list[tuple[str, str]] = []
    for name in (*ID_FILTERS, "workflow_id", "policy_id"):
        v = _str(p, name)
        if v is not None:
            filters.append((name, v))
    outcome = p.get("outcome")
    if outcome is not None:
        if outcome not in OUTCOMES:
            raise InvalidInput(f"outcome must be one of {', '.join(OUTCOMES)}")
        filters.append(("outcome", str(outcome)))
    since, until = _time(p, "since"), _time(p, "until")
    if since is not None and until is not None and since >= until:
        raise InvalidInput("since must be before until")
    tokens: tuple[str, ...] = ()
    q = _str(p, "q", MAX_Q)
    if q is not None:
        tokens = tokens_of(q)
        if not tokens:
            raise InvalidInput("q must hold at least one letter or digit")
        if len(tokens) > MAX_TOKENS:
            raise InvalidInput(f"q must hold at most {MAX_TOKENS} words")
    limit = p.get("limit", DEFAULT_SEARCH_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise InvalidInput(f"limit must be an integer between 1 and {MAX_SEARCH_LIMIT}")
    cursor = p.get("cursor")
    after = decode_cursor(cursor) if cursor is not None else None
    return SearchQuery(tenant_id, tuple(filters), since, until, tokens, limit, after)


def search_sql(s: SearchQuery, database: str = "mc") -> tuple[str, dict[str, Any]]:
    """The query of ``s`` (one ``$tenant`` mark per ``FROM``) and its bound parameters.

    Every value is a bound parameter. Reads one row more than the page, to know whether
    another page follows.
    """
    table = f"{database}.audit_events"
    where = ["$tenant"]
    params: dict[str, Any] = {"limit": s.limit + 1}
    for name, value in s.filters:
        params[name] = value
        if name == "policy_id":
            where.append("has(policy_ids, {policy_id:String})")
        elif name == "workflow_id":
            # A workflow's events: those naming it, and those of its runs and executions (a
            # step's events name only their run), found in the runs' rows, which carry their
            # workflow and execution from their labels: a small table, where the search table
            # would be read whole for the few rows that name the workflow.
            runs = f"FROM {database}.runs WHERE $tenant AND workflow_id = {{workflow_id:String}}"
            where.append(
                "(workflow_id = {workflow_id:String}"
                f" OR run_id IN (SELECT run_id {runs})"
                f" OR execution_id IN (SELECT assumeNotNull(execution_id) {runs}"
                " AND execution_id IS NOT NULL))"
            )
        else:
            where.append(f"{name} = {{{name}:String}}")
    if s.since is not None:
        params["since"] = _ch_time(s.since)
        where.append("occurred_at >= {since:DateTime64(6, 'UTC')}")
    if s.until is not None:
        params["until"] = _ch_time(s.until)
        where.append("occurred_at < {until:DateTime64(6, 'UTC')}")
    for i, token in enumerate(s.tokens):
        params[f"t{i}"] = token
        where.append(f"hasToken(text, {{t{i}:String}})")
    if s.after is not None:
        params["after_at"], params["after_id"] = s.after.occurred_at, s.after.event_id
        where.append(
            "occurred_at <= {after_at:DateTime64(6, 'UTC')} AND "
            "(occurred_at < {after_at:DateTime64(6, 'UTC')} OR event_id < {after_id:String})"
        )
    # Sorted by the whole sorting key, so ClickHouse reads the tenant's rows in reverse order
    # and stops at the limit (the tenant alone in the key's prefix is not enough for that when
    # the predicate is an IN). No FINAL: it costs more than the search (it widens every skip
    # index's selection to whole key ranges); a redelivered event's unmerged copy has the same
    # sort key, so it sits next to the original and :func:`page` drops it.
    sql = (
        f"SELECT {RESULT_COLUMNS} FROM {table} WHERE {' AND '.join(where)} "
        "ORDER BY tenant_id DESC, occurred_at DESC, event_id DESC LIMIT {limit:UInt32}"
    )
    return sql, params


def _iso(ts: str) -> str:
    return ts.replace(" ", "T") + "Z"


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return row["occurred_at"], row["event_id"]


def page(s: SearchQuery, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The answer for the rows :func:`search_sql` read: at most ``limit`` events and the cursor
    of the next page (``None`` on the last).

    A copy of an event not merged away yet is dropped (so a page may hold fewer than ``limit``
    events while another page follows); the cursor is the last row read, so the next page
    starts below the copies too.
    """
    taken = rows[: s.limit]
    unique = [r for i, r in enumerate(taken) if i == 0 or _key(r) != _key(taken[i - 1])]
    events = [
        {
            "event_id": r["event_id"],
            "position": int(r["position"]),
            "occurred_at": _iso(r["occurred_at"]),
            "event_type": r["event_type"],
            "stream_id": r["stream_id"],
            "actor": r["actor"],
            **{k: r[k] or None for k in ("run_id", "agent_id", "workflow_id", "execution_id")},
            "policy_ids": list(r["policy_ids"]),
            "outcome": r["outcome"] or None,
            "incident_id": r["incident_id"] or None,
            "excerpt": r["excerpt"] or None,
        }
        for r in unique
    ]
    more = len(rows) > s.limit
    last = rows[s.limit - 1] if more else None
    cursor = encode_cursor(Cursor(last["occurred_at"], last["event_id"])) if last else None
    return {"events": events, "next_cursor": cursor, "limit": s.limit}
