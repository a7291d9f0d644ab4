"""The budget ledger: windows and holds in the engine's own tables, changed in the caller's
transaction.

Why a row per (budget, window) with a guarded upsert rather than an event-sourced aggregate per
window: every dispatch of a tenant reserves against the same tenant window, so that window is
the hottest thing in the engine. A guarded ``INSERT ... ON CONFLICT DO UPDATE ... WHERE
reserved + spent + estimate <= cap`` costs one round trip and holds the row lock only until the
dispatch commits; the check runs on the locked, current row, so two replicas can never both
take the last dollar. An aggregate with optimistic concurrency would read, decide and append
under an expected version, and under contention retry whole dispatches (see
docs/benchmarks.md, "Budget reservations"). The events that matter for audit are still events:
``budget.set``, ``budget.threshold_crossed`` and ``execution.budget_exceeded``, and each attempt's
hold is a row named by its run.

Lock order, so that transactions touching several windows never deadlock: holds first (by run
id), then windows sorted by (budget id, window key), each in one statement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.eventbus.db import AsyncConn
from services.workflow_engine.budgets import DEFAULT_TIMEZONE, Budget, HeldWindow, crossed

WindowKey = tuple[str, str]
"""(budget id, window key)."""


@dataclass
class Movement:
    """What one transaction changes in the windows: reservations (guarded) and releases."""

    reserve: dict[WindowKey, Decimal] = field(default_factory=dict)
    release: dict[WindowKey, Decimal] = field(default_factory=dict)
    caps: dict[WindowKey, Decimal] = field(default_factory=dict)
    holds: list[tuple[str, list[WindowKey], Decimal]] = field(default_factory=list)
    """New holds: (run id, the windows it reserves in, sorted; the amount)."""

    def deltas(self) -> list[tuple[WindowKey, Decimal]]:
        """The net change of reserved per window, sorted (the lock order)."""
        keys = set(self.reserve) | set(self.release)
        out = [(k, self.reserve.get(k, Decimal(0)) - self.release.get(k, Decimal(0))) for k in keys]
        return sorted(out)


@dataclass(frozen=True)
class WindowRow:
    """A window after a change."""

    budget_id: str
    window_key: str
    cap_usd: Decimal
    reserved_usd: Decimal
    spent_usd: Decimal
    alerted_pct: int

    @property
    def committed(self) -> Decimal:
        return self.reserved_usd + self.spent_usd

    def alerts(self) -> list[int]:
        """Thresholds reached and not yet announced."""
        return crossed(self.cap_usd, self.committed, self.alerted_pct)


_ROW = "budget_id, window_key, cap_usd, reserved_usd, spent_usd, alerted_pct"

# The new holds ride along in the same statement (ids never contain a space: their patterns
# forbid it, so a space-joined list is unambiguous).
_MOVE = (
    "WITH hold AS (INSERT INTO workflow.budget_holds (tenant_id, run_id, budget_ids,"
    " window_keys, held_usd) SELECT %(t)s, h.r, string_to_array(h.b, ' '),"
    " string_to_array(h.k, ' '), h.x FROM unnest(%(hr)s::text[], %(hb)s::text[],"
    " %(hk)s::text[], %(hx)s::numeric[]) AS h(r, b, k, x))"
    " INSERT INTO workflow.budget_windows AS w (tenant_id, budget_id, window_key, cap_usd,"
    " reserved_usd) SELECT %(t)s, b, k, c, x"
    " FROM unnest(%(b)s::text[], %(k)s::text[], %(c)s::numeric[], %(x)s::numeric[])"
    " AS u(b, k, c, x)"
    " ON CONFLICT (tenant_id, budget_id, window_key) DO UPDATE"
    " SET reserved_usd = w.reserved_usd + EXCLUDED.reserved_usd, updated_at = now()"
    " WHERE EXCLUDED.reserved_usd < 0"
    " OR w.reserved_usd + w.spent_usd + EXCLUDED.reserved_usd <= w.cap_usd"
    f" RETURNING {_ROW}"
)

_SETTLE = (
    "UPDATE workflow.budget_windows w SET reserved_usd = w.reserved_usd - u.x,"
    " spent_usd = w.spent_usd + u.s, updated_at = now()"
    " FROM (SELECT l.budget_id, l.window_key, v.x, v.s FROM workflow.budget_windows l"
    " JOIN unnest(%(b)s::text[], %(k)s::text[], %(x)s::numeric[], %(s)s::numeric[])"
    " AS v(b, k, x, s) ON l.budget_id = v.b AND l.window_key = v.k"
    " WHERE l.tenant_id = %(t)s ORDER BY l.budget_id, l.window_key FOR UPDATE OF l) AS u"
    " WHERE w.tenant_id = %(t)s AND w.budget_id = u.budget_id AND w.window_key = u.window_key"
    f" RETURNING {', '.join('w.' + c for c in _ROW.split(', '))}"
)


class BudgetLedger:
    """SQL on ``workflow.budget_*``; every method runs on the caller's connection."""

    async def timezone(self, conn: AsyncConn, tenant_id: str) -> str:
        cur = await conn.execute(
            "SELECT timezone FROM workflow.budget_settings WHERE tenant_id = %s", (tenant_id,)
        )
        row = await cur.fetchone()
        return str(row["timezone"]) if row else DEFAULT_TIMEZONE

    async def budgets(
        self, conn: AsyncConn, tenant_id: str, scope: str | None = None
    ) -> tuple[list[Budget], str]:
        """The tenant's budgets (of one scope, when given) and its time zone, in one read."""
        cur = await conn.execute(
            "SELECT b.budget_id, b.scope, b.subject, b.window, b.cap_usd,"
            " (SELECT timezone FROM workflow.budget_settings s WHERE s.tenant_id = %(t)s) AS tz"
            " FROM (SELECT 1) AS one LEFT JOIN workflow.budgets b ON b.tenant_id = %(t)s"
            " AND (%(s)s::text IS NULL OR b.scope = %(s)s) ORDER BY b.budget_id",
            {"t": tenant_id, "s": scope},
        )
        rows = await cur.fetchall()
        tz = (rows[0]["tz"] if rows else None) or DEFAULT_TIMEZONE
        found = [
            Budget(r["budget_id"], r["scope"], r["subject"], r["window"], r["cap_usd"])
            for r in rows
            if r["budget_id"] is not None
        ]
        return found, tz

    async def save_budget(self, conn: AsyncConn, tenant_id: str, b: Budget) -> None:
        """Write the budget's row; a new cap applies to its windows at once, the current one
        included."""
        await conn.execute(
            'INSERT INTO workflow.budgets (tenant_id, budget_id, scope, subject, "window",'
            " cap_usd) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, budget_id)"
            " DO UPDATE SET cap_usd = EXCLUDED.cap_usd, updated_at = now()",
            (tenant_id, b.budget_id, b.scope, b.subject, b.window, b.cap_usd),
        )
        await conn.execute(
            "UPDATE workflow.budget_windows SET cap_usd = %s, updated_at = now()"
            " WHERE tenant_id = %s AND budget_id = %s",
            (b.cap_usd, tenant_id, b.budget_id),
        )

    async def save_timezone(self, conn: AsyncConn, tenant_id: str, timezone: str) -> None:
        await conn.execute(
            "INSERT INTO workflow.budget_settings (tenant_id, timezone) VALUES (%s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET timezone = EXCLUDED.timezone",
            (tenant_id, timezone),
        )

    async def move(
        self, conn: AsyncConn, tenant_id: str, m: Movement
    ) -> tuple[list[WindowRow], list[WindowKey]]:
        """Record the new holds and apply reservations and releases, in one statement guarded
        per window: the windows changed, and those refused because a reservation would take
        them over their cap (left unchanged; the caller rolls the rest back)."""
        deltas = m.deltas()
        if not deltas:
            return [], []
        cur = await conn.execute(
            _MOVE,
            {
                "t": tenant_id,
                "b": [k[0] for k, _ in deltas],
                "k": [k[1] for k, _ in deltas],
                "c": [m.caps.get(k, Decimal(0)) for k, _ in deltas],
                "x": [d for _, d in deltas],
                "hr": [h[0] for h in m.holds],
                "hb": [" ".join(k[0] for k in h[1]) for h in m.holds],
                "hk": [" ".join(k[1] for k in h[1]) for h in m.holds],
                "hx": [h[2] for h in m.holds],
            },
        )
        rows = [_row(r) for r in await cur.fetchall()]
        moved = {(r.budget_id, r.window_key) for r in rows}
        return rows, [k for k, _ in deltas if k not in moved]

    async def window(self, conn: AsyncConn, tenant_id: str, key: WindowKey) -> WindowRow | None:
        cur = await conn.execute(
            f"SELECT {_ROW} FROM workflow.budget_windows"
            " WHERE tenant_id = %s AND budget_id = %s AND window_key = %s",
            (tenant_id, *key),
        )
        r = await cur.fetchone()
        return _row(r) if r else None

    async def windows(
        self, conn: AsyncConn, tenant_id: str, keys: Iterable[WindowKey]
    ) -> dict[WindowKey, WindowRow]:
        """The windows named (those that exist)."""
        ks = list(keys)
        if not ks:
            return {}
        cur = await conn.execute(
            f"SELECT {_ROW} FROM workflow.budget_windows w"
            " JOIN unnest(%s::text[], %s::text[]) AS v(b, k) ON w.budget_id = v.b"
            " AND w.window_key = v.k WHERE w.tenant_id = %s",
            ([k[0] for k in ks], [k[1] for k in ks], tenant_id),
        )
        return {(r.budget_id, r.window_key): r for r in map(_row, await cur.fetchall())}

    async def held_windows(self, conn: AsyncConn, tenant_id: str, run_id: str) -> list[HeldWindow]:
        """The windows ``run_id``'s attempt holds a reservation in, with its own hold (none when
        no budget applied at its dispatch, or its hold is released)."""
        cur = await conn.execute(
            "SELECT w.budget_id, w.window_key, w.cap_usd, w.reserved_usd, w.spent_usd, h.held_usd"
            " FROM workflow.budget_holds h CROSS JOIN LATERAL unnest(h.budget_ids, h.window_keys)"
            " AS k(b, wk) JOIN workflow.budget_windows w ON w.tenant_id = h.tenant_id"
            " AND w.budget_id = k.b AND w.window_key = k.wk"
            " WHERE h.tenant_id = %s AND h.run_id = %s AND h.expected IS NULL",
            (tenant_id, run_id),
        )
        return [
            HeldWindow(r["budget_id"], r["window_key"], r["cap_usd"], r["reserved_usd"],
                       r["spent_usd"], r["held_usd"])
            for r in await cur.fetchall()
        ]  # fmt: skip

    async def settle(
        self, conn: AsyncConn, tenant_id: str, run_id: str, cost: Decimal
    ) -> list[WindowRow]:
        """One recorded step of ``run_id`` was costed.

        A cost moves that much of the hold from reserved to spent (more than the hold is spent
        all the same); the hold's remainder is released once the run has ended and each of its
        recorded steps is costed.
        """
        cur = await conn.execute(
            "UPDATE workflow.budget_holds h SET spent_usd = h.spent_usd + %(c)s,"
            " costed = h.costed + 1, held_usd = CASE WHEN h.expected IS NOT NULL"
            " AND h.costed + 1 >= h.expected THEN 0 ELSE GREATEST(h.held_usd - %(c)s, 0) END"
            " FROM (SELECT held_usd FROM workflow.budget_holds WHERE tenant_id = %(t)s"
            " AND run_id = %(r)s FOR UPDATE) AS old WHERE h.tenant_id = %(t)s"
            " AND h.run_id = %(r)s RETURNING old.held_usd AS before, h.held_usd AS after,"
            " h.budget_ids, h.window_keys",
            {"t": tenant_id, "r": run_id, "c": cost},
        )
        row = await cur.fetchone()
        if row is None:
            return []
        return await self._apply_settle(conn, tenant_id, row, cost)

    async def end_attempts(
        self, conn: AsyncConn, tenant_id: str, recorded: Mapping[str, int]
    ) -> Movement:
        """The runs named ended with that many recorded steps: release what no cost is still
        coming for. Returns the releases for the caller's one window statement."""
        m = Movement()
        for run_id in sorted(recorded):
            cur = await conn.execute(
                "UPDATE workflow.budget_holds h SET expected = %(n)s,"
                " held_usd = CASE WHEN h.costed >= %(n)s THEN 0 ELSE h.held_usd END"
                " FROM (SELECT held_usd FROM workflow.budget_holds WHERE tenant_id = %(t)s"
                " AND run_id = %(r)s FOR UPDATE) AS old WHERE h.tenant_id = %(t)s"
                " AND h.run_id = %(r)s AND h.expected IS NULL"
                " RETURNING old.held_usd AS before, h.held_usd AS after, h.budget_ids,"
                " h.window_keys",
                {"t": tenant_id, "r": run_id, "n": recorded[run_id]},
            )
            row = await cur.fetchone()
            if row is None:
                continue
            freed = row["before"] - row["after"]
            if freed > 0:
                for key in zip(row["budget_ids"], row["window_keys"], strict=True):
                    m.release[key] = m.release.get(key, Decimal(0)) + freed
        return m

    async def release(self, conn: AsyncConn, tenant_id: str, m: Movement) -> list[WindowRow]:
        """Apply releases only (no reservation: no guard)."""
        deltas = m.deltas()
        if not deltas:
            return []
        return await self._update(conn, tenant_id, deltas, [Decimal(0)] * len(deltas))

    async def _apply_settle(
        self, conn: AsyncConn, tenant_id: str, row: Mapping[str, Any], cost: Decimal
    ) -> list[WindowRow]:
        freed = row["before"] - row["after"]
        keys = sorted(zip(row["budget_ids"], row["window_keys"], strict=True))
        deltas = [(k, -freed) for k in keys]
        return await self._update(conn, tenant_id, deltas, [cost] * len(keys))

    async def _update(
        self,
        conn: AsyncConn,
        tenant_id: str,
        deltas: Sequence[tuple[WindowKey, Decimal]],
        spent: Sequence[Decimal],
    ) -> list[WindowRow]:
        cur = await conn.execute(
            _SETTLE,
            {
                "t": tenant_id,
                "b": [k[0] for k, _ in deltas],
                "k": [k[1] for k, _ in deltas],
                "x": [-d for _, d in deltas],
                "s": list(spent),
            },
        )
        return [_row(r) for r in await cur.fetchall()]

    async def mark_alerted(self, conn: AsyncConn, tenant_id: str, row: WindowRow, pct: int) -> None:
        await conn.execute(
            "UPDATE workflow.budget_windows SET alerted_pct = GREATEST(alerted_pct, %s)"
            " WHERE tenant_id = %s AND budget_id = %s AND window_key = %s",
            (pct, tenant_id, row.budget_id, row.window_key),
        )

    async def report(
        self, conn: AsyncConn, tenant_id: str, budgets: Sequence[Budget], keys: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """Each budget with its current window's spent, reserved and remaining."""
        found = await self.windows(
            conn, tenant_id, [(b.budget_id, keys[b.budget_id]) for b in budgets]
        )
        out = []
        for b in budgets:
            w = found.get((b.budget_id, keys[b.budget_id]))
            spent = w.spent_usd if w else Decimal(0)
            reserved = w.reserved_usd if w else Decimal(0)
            out.append(
                {
                    "budget_id": b.budget_id,
                    "scope": b.scope,
                    "subject": b.subject,
                    "window": b.window,
                    "window_key": keys[b.budget_id],
                    "cap_usd": _s(b.cap_usd),
                    "spent_usd": _s(spent),
                    "reserved_usd": _s(reserved),
                    "remaining_usd": _s(max(b.cap_usd - spent - reserved, Decimal(0))),
                    "alerted_pct": w.alerted_pct if w else 0,
                }
            )
        return out


def _s(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


def _row(r: Mapping[str, Any]) -> WindowRow:
    return WindowRow(
        r["budget_id"], r["window_key"], r["cap_usd"], r["reserved_usd"], r["spent_usd"],
        int(r["alerted_pct"]),
    )  # fmt: skip
