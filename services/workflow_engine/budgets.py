"""Budgets: caps on what executions may spend, and the rules dispatch reserves by.

A budget caps the cost of workflow steps in one *scope* (the whole tenant, one agent, one
workflow, or one execution) over a *window*: a calendar ``day`` or ``month`` in the tenant's
time zone, or each ``execution`` on its own. Its id names all three, e.g. ``tenant:month``,
``agent:writer:day``, ``workflow:release-notes:execution``.

Every window of a budget has a cap, what attempts still out have reserved, and what was spent.
Dispatching a step reserves its estimate in every window that applies, and is refused when that
would take one over its cap (``reserved + spent + estimate > cap``). Alerts fire when committed
spend (spent + reserved) reaches 80, 90 and 100 % of the cap, once per threshold per window.

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import get_args
from zoneinfo import ZoneInfo, available_timezones

from libs.contracts.events import BudgetScope, BudgetWindow
from libs.errors import InvalidInput
from services.workflow_engine.definitions import WorkflowDocument

THRESHOLDS: tuple[int, ...] = (80, 90, 100)
DEFAULT_TIMEZONE = "UTC"
BUDGET_CATEGORY = "budget"
SCOPES: tuple[str, ...] = get_args(BudgetScope)
WINDOWS: tuple[str, ...] = get_args(BudgetWindow)


def budget_id_for(scope: BudgetScope, subject: str, window: BudgetWindow) -> str:
    """``scope[:subject]:window``: one budget per scope, subject and window."""
    return ":".join(p for p in (scope, subject, window) if p)


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA time zone; :class:`InvalidInput` naming it otherwise.

    Checked against the zone list rather than by loading it: a name is a path into the zone
    database, and a directory (``America``) or another file there is no time zone.
    """
    if name not in _zones():
        raise InvalidInput(f"unknown time zone {name!r} (expected an IANA name such as UTC or "
                           "Europe/Paris)")  # fmt: skip
    return name


@dataclass(frozen=True)
class Budget:
    """One budget as set."""

    budget_id: str
    scope: BudgetScope
    subject: str
    window: BudgetWindow
    cap_usd: Decimal

    @classmethod
    def of(cls, scope: str, subject: str, window: str, cap_usd: Decimal) -> Budget:
        """A validated budget; :class:`InvalidInput` naming what is wrong."""
        if scope not in SCOPES:
            raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if window not in WINDOWS:
            raise InvalidInput(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        if scope == "tenant" and subject:
            raise InvalidInput("a tenant budget takes no subject")
        if scope != "tenant" and not subject:
            raise InvalidInput(f"a {scope} budget needs a subject: the {scope}'s id")
        if scope == "execution" and window != "execution":
            raise InvalidInput("an execution budget's window is the execution")
        if cap_usd < 0:
            raise InvalidInput("cap_usd must not be negative")
        sc: BudgetScope = scope  # type: ignore[assignment]
        wi: BudgetWindow = window  # type: ignore[assignment]
        return cls(budget_id_for(sc, subject, wi), sc, subject, wi, cap_usd)

    def covers(self, agent_id: str) -> bool:
        """Whether a step served by ``agent_id`` counts against this budget (already known to
        apply to the step's tenant, workflow and execution)."""
        return self.scope != "agent" or self.subject == agent_id

    def window_key(self, now: datetime, timezone: str, execution_id: str) -> str:
        """The window ``now`` falls in: ``2026-11-30``, ``2026-11`` or the execution id."""
        if self.window == "execution":
            return execution_id
        local = now.astimezone(ZoneInfo(timezone))
        return local.strftime("%Y-%m-%d" if self.window == "day" else "%Y-%m")


def applicable(budgets: Iterable[Budget], workflow_id: str, execution_id: str) -> list[Budget]:
    """The budgets that can apply to steps of this execution (agent budgets still filtered per
    step by :meth:`Budget.covers`)."""
    return [
        b
        for b in budgets
        if b.scope in ("tenant", "agent")
        or (b.scope == "workflow" and b.subject == workflow_id)
        or (b.scope == "execution" and b.subject == execution_id)
    ]


def estimate_under(budget: Budget, document: WorkflowDocument) -> Decimal:
    """The estimate of the execution's steps that count against ``budget``."""
    return sum((s.estimate.cost_usd for s in document.steps if budget.covers(s.agent)), Decimal(0))


def crossed(cap: Decimal, committed: Decimal, alerted_pct: int) -> list[int]:
    """The thresholds reached by ``committed`` and not announced yet in this window."""
    if cap <= 0:
        return [t for t in THRESHOLDS if t > alerted_pct]
    return [t for t in THRESHOLDS if t > alerted_pct and committed * 100 >= cap * t]


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a budget halts an execution: the window, cap, what is committed and the estimate."""

    budget: Budget
    window_key: str
    committed_usd: Decimal
    estimate_usd: Decimal
    step_id: str | None = None

    @property
    def reason(self) -> str:
        """One line naming the budget, window, cap and estimate."""
        b = self.budget
        window = "each execution" if b.window == "execution" else f"{b.window} {self.window_key}"
        if self.step_id is None:
            return (
                f"budget {b.budget_id} ({window}): the execution's estimate "
                f"${_usd(self.estimate_usd)} exceeds the cap ${_usd(b.cap_usd)}"
            )
        return (
            f"budget {b.budget_id} ({window}): step {self.step_id!r} estimate "
            f"${_usd(self.estimate_usd)} does not fit; ${_usd(self.committed_usd)} of the cap "
            f"${_usd(b.cap_usd)} is already spent or reserved"
        )


def _usd(d: Decimal) -> str:
    return format(d.normalize(), "f") if d else "0"


@dataclass(frozen=True)
class HeldWindow:
    """One window an attempt holds a reservation in, as it stands, with the attempt's own hold."""

    budget_id: str
    window_key: str
    cap_usd: Decimal
    reserved_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal
    """What of ``reserved_usd`` is this attempt's own (its estimate less what it already spent)."""

    @property
    def committed_by_others(self) -> Decimal:
        """Spent, plus what other attempts reserved: the window less this attempt's hold."""
        return self.spent_usd + self.reserved_usd - self.held_usd


@dataclass(frozen=True)
class StreamedOverrun:
    """A running attempt's streamed cost would take a window over its cap."""

    window: HeldWindow
    streamed_usd: Decimal
    step_id: str

    @property
    def reason(self) -> str:
        """One line naming the budget, window, cap, what others committed and the stream."""
        w = self.window
        return (
            f"budget {w.budget_id} ({w.window_key}): step {self.step_id!r} was stopped mid-way: "
            f"its streamed cost ${_usd(self.streamed_usd)} does not fit; "
            f"${_usd(w.committed_by_others)} of the cap ${_usd(w.cap_usd)} is already spent or "
            "reserved"
        )


def streamed_overrun(
    windows: Iterable[HeldWindow], streamed_usd: Decimal, step_id: str
) -> StreamedOverrun | None:
    """The first window (by budget id) the streamed cost of a running call does not fit in.

    While the call streams, its cost so far takes the place of the attempt's hold: the window
    would go over when ``spent + reserved by others + streamed > cap``. (The attempt's calls
    recorded earlier are in ``spent`` once costed.) A cost under the hold never stops a step.
    """
    for w in sorted(windows, key=lambda w: (w.budget_id, w.window_key)):
        if w.committed_by_others + streamed_usd > w.cap_usd:
            return StreamedOverrun(w, streamed_usd, step_id)
    return None
