"""Executive debriefs: one incident (or every incident of a period) told for a reader who was not
there, folded from the event store's events (no I/O but reading a runbook file).

* **What happened**: the run's timeline, event by event, and its inflection point (the step
  where it went wrong, as :func:`~services.audit_replay.domain.views.inflection_point` finds it).
* **Impact**: runs stopped, cost spent (the priced steps), cost prevented (the denied step's
  estimated cost when admission recorded one), and the times to detect (the denied decision to
  the incident), to stop (the decision to the run stopped) and to resolve (the incident opened
  to resolved).
* **Recommended actions**: the "Act." paragraph of the policy's runbook
  (``policy-bundle/runbooks/<name>.md``, named by the policy's ``runbook_url``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from libs.contracts.envelope import EventEnvelope
from services.audit_replay.domain.replay import ReplayState, evolve_replay, replay_answer
from services.audit_replay.reports.model import (
    Figure,
    KeyFigures,
    Paragraph,
    Report,
    Section,
    Table,
)

RUNBOOKS = Path(__file__).resolve().parents[3] / "policy-bundle" / "runbooks"
_ACT = re.compile(r"\*\*Act\.\*\*\s*(.+?)(?:\n\s*\n|\Z)", re.S)
_RUNBOOK_NAME = re.compile(r"^[a-z0-9_]{1,80}\.md$")
DEFAULT_ACTION = (
    "Read the run's trace from its inflection point, fix the agent or the policy's settings, "
    "and resolve the incident with what was done."
)


def runbook_action(runbook_url: str | None, policy_id: str) -> tuple[str, str]:
    """The runbook's name and its "Act." paragraph (a generic action when there is none)."""
    candidates = []
    if runbook_url:
        candidates.append(runbook_url.rstrip("/").rsplit("/", 1)[-1])
    candidates.append(policy_id.replace("-", "_") + ".md")
    for name in candidates:
        if not _RUNBOOK_NAME.fullmatch(name):
            continue
        path = RUNBOOKS / name
        if path.is_file():
            m = _ACT.search(path.read_text())
            if m:
                return name, " ".join(m.group(1).split())
    return "", DEFAULT_ACTION


def _seconds(a: EventEnvelope | None, b: EventEnvelope | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b.occurred_at - a.occurred_at).total_seconds(), 3)


def _first(envs: list[EventEnvelope], event_type: str, **match: Any) -> EventEnvelope | None:
    for e in envs:
        if e.event_type == event_type and all(e.payload.get(k) == v for k, v in match.items()):
            return e
    return None


def _summary(e: EventEnvelope) -> str:
    p = e.payload
    t = e.event_type
    if t == "admission.decided":
        reasons = "; ".join(str(r.get("message", "")) for r in p.get("reasons") or [])
        return f"step {p.get('step_index')} {p.get('outcome')}" + (
            f": {reasons}" if reasons else ""
        )
    if t == "run.step_recorded":
        return f"step {p.get('step_index')} recorded ({p.get('model') or p.get('tool') or ''})"
    if t == "cost.recorded":
        return f"step {p.get('step_index')} cost {p.get('total_cost_usd') or 'unpriced'}"
    if t.startswith("incident."):
        return f"{t.split('.')[1]} {p.get('incident_id')} {p.get('title') or p.get('by') or ''}"
    if t == "run.stopped_by_policy":
        return f"stopped at step {p.get('step_index')} by {p.get('policy_id')}: {p.get('reason')}"
    return t


def incident_debrief(
    incident_id: str,
    history: Iterable[EventEnvelope],
    policies: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The debrief of one incident from its run's history (run, decisions, costs, incidents).

    ``policies``: policy id → its ``title`` and ``runbook_url`` (from the bundle activations).
    """
    envs = sorted(history, key=lambda e: e.position or 0)
    state = ReplayState()
    for e in envs:
        state = evolve_replay(state, e)
    answer = replay_answer(state)
    opened = _first(envs, "incident.opened", incident_id=incident_id)
    if opened is None:
        raise ValueError(f"incident {incident_id} has no opened event in its history")
    policy_id = str(opened.payload.get("policy_id"))
    denied = _first(envs, "admission.decided", outcome="deny")
    stopped = _first(envs, "run.stopped_by_policy")
    resolved = _first(envs, "incident.resolved", incident_id=incident_id)
    started = _first(envs, "run.started")
    priced = [
        Decimal(str(e.payload["total_cost_usd"]))
        for e in envs
        if e.event_type == "cost.recorded" and e.payload.get("total_cost_usd") is not None
    ]
    estimate = ((denied.payload.get("context") or {}).get("estimate") or {}) if denied else {}
    prevented = estimate.get("cost_usd")
    info = policies.get(policy_id, {})
    runbook, action = runbook_action(info.get("runbook_url"), policy_id)
    return {
        "document": "incident-debrief",
        "incident_id": incident_id,
        "tenant_id": opened.tenant_id,
        "run_id": opened.payload.get("run_id"),
        "agent_id": opened.payload.get("agent_id"),
        "policy_id": policy_id,
        "policy_title": info.get("title") or policy_id,
        "severity": opened.payload.get("severity"),
        "title": opened.payload.get("title"),
        "status": "resolved" if resolved else "open",
        "resolution": resolved.payload.get("resolution") if resolved else None,
        "inflection_point": answer["inflection_point"],
        "timeline": [
            {
                "event_id": str(e.event_id),
                "occurred_at": e.occurred_at.isoformat(),
                "event_type": e.event_type,
                "summary": _summary(e),
            }
            for e in envs
        ],
        "impact": {
            "runs_stopped": 1 if stopped else 0,
            "cost_spent_usd": str(sum(priced, Decimal(0))) if priced else None,
            "cost_prevented_usd": None if prevented is None else str(prevented),
            "time_to_detect_s": _seconds(denied, opened),
            "time_to_stop_s": _seconds(denied, stopped),
            "time_to_resolve_s": _seconds(opened, resolved),
            "run_duration_s": _seconds(started, stopped),
        },
        "recommended_actions": [{"runbook": runbook, "action": action}],
    }


def _v(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def debrief_sections(d: dict[str, Any]) -> tuple[Section, ...]:
    """One incident's sections: what happened, impact, recommended actions."""
    ip = d["inflection_point"]
    what = (
        f"Run {d['run_id']} of agent {d['agent_id']} broke policy {d['policy_title']} "
        f"({d['severity']}): {d['title']}. "
        + (
            f"It went wrong at step {ip['step_index']} ({ip.get('reason') or ip.get('policy_id')})."
            if ip
            else "No denied step was recorded."
        )
        + (f" Resolved: {d['resolution']}." if d["resolution"] else " The incident is open.")
    )
    imp = d["impact"]
    return (
        Section(
            f"Incident {d['incident_id']}: what happened",
            (
                Paragraph(what),
                Table(
                    ("When", "Event", "What"),
                    tuple((t["occurred_at"], t["event_type"], t["summary"]) for t in d["timeline"]),
                    caption="Timeline",
                ),
            ),
        ),
        Section(
            f"Incident {d['incident_id']}: impact",
            (
                KeyFigures(
                    (
                        Figure("Runs stopped", str(imp["runs_stopped"])),
                        Figure("Cost spent (USD)", _v(imp["cost_spent_usd"])),
                        Figure("Cost prevented (USD, estimate)", _v(imp["cost_prevented_usd"])),
                        Figure("Time to detect", _v(imp["time_to_detect_s"], " s")),
                        Figure("Time to stop", _v(imp["time_to_stop_s"], " s")),
                        Figure("Time to resolve", _v(imp["time_to_resolve_s"], " s")),
                    )
                ),
            ),
        ),
        Section(
            f"Incident {d['incident_id']}: recommended actions",
            tuple(
                Paragraph((f"From runbook {a['runbook']}: " if a["runbook"] else "") + a["action"])
                for a in d["recommended_actions"]
            ),
        ),
    )


def debrief_report(d: dict[str, Any]) -> Report:
    """One incident's debrief as a report."""
    return Report(
        title=f"Executive debrief: {d['title']}",
        subtitle=(f"Tenant: {d['tenant_id']}", f"Incident: {d['incident_id']} ({d['status']})"),
        sections=debrief_sections(d),
    )


def period_debrief_report(
    tenant: str, start: str, end: str, debriefs: list[dict[str, Any]]
) -> Report:
    """Every incident of a period: a summary table then each incident's sections."""
    summary = Section(
        "Summary",
        (
            KeyFigures(
                (
                    Figure("Incidents", str(len(debriefs))),
                    Figure("Runs stopped", str(sum(d["impact"]["runs_stopped"] for d in debriefs))),
                    Figure("Resolved", str(sum(d["status"] == "resolved" for d in debriefs))),
                )
            ),
            Table(
                ("Incident", "Severity", "Policy", "Status", "Time to resolve"),
                tuple(
                    (
                        d["incident_id"],
                        str(d["severity"]),
                        d["policy_id"],
                        d["status"],
                        _v(d["impact"]["time_to_resolve_s"], " s"),
                    )
                    for d in debriefs
                ),
            ),
        ),
    )
    return Report(
        title="Executive debrief",
        subtitle=(f"Tenant: {tenant}", f"Period: {start} to {end}"),
        sections=(summary, *(s for d in debriefs for s in debrief_sections(d))),
    )
