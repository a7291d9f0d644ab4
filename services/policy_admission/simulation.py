"""Counterfactual simulation: what a candidate bundle would have decided on past decisions.

Pure: no I/O here. The job (:mod:`services.policy_admission.simulation_jobs`) reads pages of
recorded decisions from audit-replay, rebuilds each decision's Rego input with
:func:`rebuild_input`, has the candidate evaluate them (:mod:`~services.policy_admission.
simulation_eval`), and folds the answers into a :class:`Tally`; at the end it asks for the step
costs of the runs that would have stopped and :meth:`Tally.report` says, per policy, which
decisions flip, which runs stop at which step and what cost that prevents.

Policy exceptions are applied as admission applies them (:func:`~services.policy_admission.
exceptions.waiving`), with the waivers that were open at each decision's own time
(:func:`waivers_at`): granted at or before it, not yet revoked, and strictly before their expiry.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from libs.contracts.events import Outcome, Reason
from services.policy_admission.domain import RUN_STATE_POLICY, Decision, interpret, waive
from services.policy_admission.exceptions import Waiver, waiving

MAX_LISTED = 1000
"""How many flipped decisions and stopped runs a report lists (the counts cover them all)."""

TRANSITIONS = (
    "allow_to_deny",
    "warn_to_deny",
    "allow_to_warn",
    "deny_to_allow",
    "deny_to_warn",
    "warn_to_allow",
    "warn_changed",
)
"""The kinds of flip, stricter first. ``warn_changed``: a warn either way, for other policies."""

_RANK = {"allow": 0, "warn": 1, "deny": 2}

# The context keys decision_context adds beside the run document.
_CONTEXT_ONLY = ("step", "estimate", "exceptions", "environment", "policy_set_hash", "agent")
# What admission put at the top of the input and the context keeps beside the run document.
_INPUT_TOP = ("policy_set_hash", "agent")


@dataclass(frozen=True)
class RecordedDecision:
    """One past decision, as audit-replay projects ``admission.decided``."""

    decision_id: str
    run_id: str
    step_index: int
    outcome: Outcome
    reasons: tuple[Reason, ...]
    context: Mapping[str, Any]
    occurred_at: datetime

    @property
    def agent_id(self) -> str | None:
        """The run's agent as the decision saw it."""
        agent = self.context.get("agent_id")
        return agent if isinstance(agent, str) and agent else None


def rebuild_input(
    tenant_id: str,
    step_index: int,
    context: Mapping[str, Any],
    *,
    environment: str,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Rego ``input`` a recorded decision was made on, from its ``context`` (the inverse of
    :func:`~services.policy_admission.domain.decision_context`).

    The context holds the run document, the step asked for and its estimate. Decisions recorded
    before the context named its environment are read as made in ``environment``. The tenant's
    settings are not recorded with each decision: ``settings`` (the current ones) are given.
    """
    step = context.get("step") or {}
    doc: dict[str, Any] = {
        "tenant_id": tenant_id,
        "environment": context.get("environment") or environment,
        "run": {k: v for k, v in context.items() if k not in _CONTEXT_ONLY},
        "step": {
            "index": step_index,
            "kind": step.get("kind"),
            "model": step.get("model"),
            "tool": step.get("tool"),
            "estimate": dict(context.get("estimate") or {}),
        },
    }
    for key in _INPUT_TOP:
        if key in context:
            doc[key] = context[key]
    if settings is not None:
        doc["settings"] = dict(settings)
    return doc


def waivers_at(waivers: Iterable[Waiver], at: datetime) -> tuple[Waiver, ...]:
    """The waivers open at ``at``, each as admission held it then (status ``open``): granted at
    or before ``at`` and not closed by then. Expiry is left to :meth:`Waiver.applies`, which
    compares it with the decision's time exactly as admission does."""
    out = []
    for w in waivers:
        if w.granted_at > at:
            continue
        if w.status == "revoked" and w.closed_at is not None and w.closed_at <= at:
            continue
        out.append(w if w.status == "open" else replace(w, status="open"))
    return tuple(out)


def simulated_decision(
    raw: Mapping[str, Any], record: RecordedDecision, waivers: Sequence[Waiver]
) -> Decision:
    """The candidate's ``decision`` document for ``record`` read as admission reads it, with the
    waivers open at the decision's time applied."""
    decision = interpret(dict(raw))
    if decision.outcome == "deny" and waivers:
        decision = waive(
            decision,
            waiving(
                waivers_at(waivers, record.occurred_at),
                decision.denies,
                agent_id=record.agent_id,
                run_id=record.run_id,
                at=record.occurred_at,
            ),
        )
    return decision


def transition(recorded: Outcome, simulated: Outcome) -> str | None:
    """The kind of flip from ``recorded`` to ``simulated`` (``None``: the same outcome)."""
    if recorded == simulated:
        return None
    return f"{recorded}_to_{simulated}"


def flip_policies(recorded: Sequence[Reason], simulated: Decision, kind: str) -> tuple[str, ...]:
    """The policies a flip is counted under: those whose reasons appear (a stricter outcome) or
    disappear (a looser one); a ``warn_changed`` counts every policy that differs. When the
    policy ids are the same on both sides (a message changed), every one of the stricter side."""
    old = list(dict.fromkeys(r.policy_id for r in recorded))
    new = list(dict.fromkeys(r.policy_id for r in simulated.reasons))
    if kind == "warn_changed":
        return tuple(p for p in new if p not in old) + tuple(p for p in old if p not in new)
    stricter = _RANK[simulated.outcome] > _RANK[_outcome_of(kind)]
    if stricter:
        side = [r.policy_id for r in simulated.denies] if simulated.outcome == "deny" else new
        side = list(dict.fromkeys(side))
        changed = [p for p in side if p not in old]
        return tuple(changed or side)
    changed = [p for p in old if p not in new]
    return tuple(changed or old)


def _outcome_of(kind: str) -> str:
    return kind.split("_to_")[0]


@dataclass
class PolicyTally:
    """One policy's share of the report."""

    flips: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRANSITIONS, 0))
    runs_stopped: int = 0
    prevented_cost_usd: Decimal = Decimal(0)
    unpriced_steps: int = 0

    @property
    def flipped(self) -> int:
        """Decisions that flip because of this policy."""
        return sum(self.flips.values())


@dataclass(frozen=True)
class Stop:
    """The first step of a run the candidate would have denied (and the recorded one did not)."""

    run_id: str
    agent_id: str | None
    step_index: int
    decision_id: str
    policy_id: str


@dataclass
class Tally:
    """The report being built, one page of decisions at a time."""

    decisions: int = 0
    waived: int = 0
    policies: dict[str, PolicyTally] = field(default_factory=dict)
    flips: list[dict[str, Any]] = field(default_factory=list)
    flipped: int = 0
    stops: dict[str, Stop] = field(default_factory=dict)
    errors: int = 0

    def _policy(self, policy_id: str) -> PolicyTally:
        tally = self.policies.get(policy_id)
        if tally is None:
            tally = self.policies[policy_id] = PolicyTally()
        return tally

    def add(self, record: RecordedDecision, simulated: Decision) -> None:
        """Count one decision: its flip (if any) under each policy responsible, and the earliest
        step of its run flipped to deny."""
        self.decisions += 1
        if simulated.exceptions:
            self.waived += 1
        kind = transition(record.outcome, simulated.outcome)
        if kind is None and record.outcome == "warn":
            old = {r.policy_id for r in record.reasons}
            if old != {r.policy_id for r in simulated.reasons}:
                kind = "warn_changed"
        if kind is None:
            return
        policies = flip_policies(record.reasons, simulated, kind)
        for policy_id in policies:
            self._policy(policy_id).flips[kind] += 1
        self.flipped += 1
        if len(self.flips) < MAX_LISTED:
            self.flips.append(
                {
                    "decision_id": record.decision_id,
                    "run_id": record.run_id,
                    "agent_id": record.agent_id,
                    "step_index": record.step_index,
                    "occurred_at": record.occurred_at.isoformat(),
                    "recorded": record.outcome,
                    "simulated": simulated.outcome,
                    "kind": kind,
                    "policy_ids": list(policies),
                    "exceptions": list(simulated.exceptions),
                }
            )
        if simulated.outcome == "deny" and record.outcome != "deny":
            self._stop(record, simulated)

    def _stop(self, record: RecordedDecision, simulated: Decision) -> None:
        violated = simulated.violated
        if violated is None or violated.policy_id == RUN_STATE_POLICY:
            return  # the run was already stopped: no step of its own would stop it
        current = self.stops.get(record.run_id)
        if current is not None and current.step_index <= record.step_index:
            return
        self.stops[record.run_id] = Stop(
            run_id=record.run_id,
            agent_id=record.agent_id,
            step_index=record.step_index,
            decision_id=record.decision_id,
            policy_id=violated.policy_id,
        )

    def report(
        self, step_costs: Mapping[str, Mapping[int, Decimal | None]], *, total: int | None = None
    ) -> dict[str, Any]:
        """The report; ``step_costs`` holds, per stopped run, the recorded cost of each step
        (``None`` for a step that could not be priced). A stopped run prevents the cost of its
        steps from the stopping step on."""
        stopped: list[dict[str, Any]] = []
        prevented_total = Decimal(0)
        for stop in sorted(self.stops.values(), key=lambda s: (s.policy_id, s.run_id)):
            costs = step_costs.get(stop.run_id, {})
            later = [c for i, c in costs.items() if i >= stop.step_index]
            prevented = sum((c for c in later if c is not None), Decimal(0))
            unpriced = sum(1 for c in later if c is None)
            tally = self._policy(stop.policy_id)
            tally.runs_stopped += 1
            tally.prevented_cost_usd += prevented
            tally.unpriced_steps += unpriced
            prevented_total += prevented
            if len(stopped) < MAX_LISTED:
                stopped.append(
                    {
                        "run_id": stop.run_id,
                        "agent_id": stop.agent_id,
                        "step_index": stop.step_index,
                        "decision_id": stop.decision_id,
                        "policy_id": stop.policy_id,
                        "prevented_cost_usd": _usd(prevented),
                        "unpriced_steps": unpriced,
                    }
                )
        return {
            "decisions": self.decisions,
            "flipped": self.flipped,
            "waived": self.waived,
            "runs_stopped": len(self.stops),
            "prevented_cost_usd": _usd(prevented_total),
            "policies": [
                {
                    "policy_id": policy_id,
                    "flipped": t.flipped,
                    "flips": dict(t.flips),
                    "runs_stopped": t.runs_stopped,
                    "prevented_cost_usd": _usd(t.prevented_cost_usd),
                    "unpriced_steps": t.unpriced_steps,
                }
                for policy_id, t in sorted(self.policies.items())
            ],
            "stopped_runs": stopped,
            "flipped_decisions": self.flips,
        }


def _usd(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000001")))


CSV_COLUMNS = (
    "policy_id",
    "flipped",
    *TRANSITIONS,
    "runs_stopped",
    "prevented_cost_usd",
    "unpriced_steps",
)


def _cell(text: str) -> str:
    """``text`` safe in a spreadsheet: a leading ``= + - @`` is quoted so it is not a formula."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@") else text


def report_csv(report: Mapping[str, Any]) -> str:
    """The report's per-policy rows as CSV (one row per policy, then a ``*`` row of totals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in report["policies"]:
        writer.writerow(
            [
                _cell(p["policy_id"]),
                p["flipped"],
                *(p["flips"][k] for k in TRANSITIONS),
                p["runs_stopped"],
                p["prevented_cost_usd"],
                p["unpriced_steps"],
            ]
        )
    writer.writerow(
        [
            "*",
            report["flipped"],
            *("" for _ in TRANSITIONS),
            report["runs_stopped"],
            report["prevented_cost_usd"],
            "",
        ]
    )
    return out.getvalue()
