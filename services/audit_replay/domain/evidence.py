"""SOC2 evidence for a period, folded from the event store's events (no I/O).

The evidence is organised control by control (CC6.1, CC6.2/6.3, CC7.2, CC7.3/7.4, CC8.1). Each
control holds figures (a count or a duration) that name the ids of the events they were counted
from, and records (one line per event that matters to an auditor: a key issued, a bundle
activated, an approval). The same evidence renders to JSON, CSV and a PDF with charts.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.contracts.envelope import EventEnvelope
from services.audit_replay.reports.model import (
    BarChart,
    Figure,
    KeyFigures,
    Paragraph,
    Report,
    Section,
    Table,
)

SCHEMA_VERSION = 1
# The tenant whose events (the repository's policy bundle) apply to every tenant.
SHARED_TENANT = "system"

ACCESS_EVENTS = (
    "user.created",
    "user.disabled",
    "user.role_granted",
    "user.role_revoked",
    "api_key.issued",
    "api_key.revoked",
)
KEY_EVENTS = ("policy.signing_key_registered", "policy.signing_key_retired")
MONITORING_EVENTS = (
    "policy.violation_detected",
    "budget.threshold_crossed",
    "execution.budget_exceeded",
    "policy.drift_detected",
    "incident.opened",
)
INCIDENT_EVENTS = ("incident.opened", "incident.acknowledged", "incident.resolved")
FREEZE_EVENTS = ("policy.freeze_started", "policy.freeze_lifted", "policy.freeze_overridden")
BUNDLE_EVENTS = ("policy.bundle_uploaded", "policy.bundle_activated")
PROMOTION_EVENTS = (
    "promotion.requested",
    "promotion.approved",
    "promotion.rejected",
    "promotion.executed",
    "promotion.expired",
    "promotion.went_stale",
)
EXCEPTION_EVENTS = (
    "policy.exception_granted",
    "policy.exception_revoked",
    "policy.exception_expired",
)
CONTROL_TITLES = {
    "CC6.1": "Logical access",
    "CC6.2/6.3": "Access changes",
    "CC7.2": "Monitoring",
    "CC7.3/7.4": "Incident response",
    "CC8.1": "Change management",
}
CSV_COLUMNS = ("control", "kind", "name", "value", "occurred_at", "event_ids")


@dataclass(frozen=True)
class Period:
    """One tenant's half-open time range ``[start, end)``."""

    tenant: str
    start: datetime
    end: datetime

    def holds(self, env: EventEnvelope) -> bool:
        """Whether ``env`` is the tenant's (or the shared bundle's) and happened in the period."""
        return env.tenant_id in (self.tenant, SHARED_TENANT) and (
            self.start <= env.occurred_at < self.end
        )


@dataclass
class Control:
    """One control's figures and records."""

    control_id: str
    figures: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def figure(
        self, name: str, label: str, envs: Iterable[EventEnvelope], value: Any = None
    ) -> None:
        """A figure counted from ``envs`` (its value: how many, unless ``value`` is given)."""
        ids = [str(e.event_id) for e in envs]
        self.figures.append(
            {
                "name": name,
                "label": label,
                "value": len(ids) if value is None else value,
                "event_ids": ids,
            }
        )

    def record(self, env: EventEnvelope, summary: str) -> None:
        """One event an auditor reads line by line."""
        self.records.append(
            {
                "event_id": str(env.event_id),
                "event_type": env.event_type,
                "occurred_at": env.occurred_at.isoformat(),
                "actor": env.actor,
                "position": env.position,
                "summary": summary,
            }
        )

    def view(self) -> dict[str, Any]:
        """The control as JSON."""
        return {
            "control_id": self.control_id,
            "title": CONTROL_TITLES[self.control_id],
            "figures": self.figures,
            "records": self.records,
        }


def _of(envs: list[EventEnvelope], *types: str) -> list[EventEnvelope]:
    return [e for e in envs if e.event_type in types]


def _p(env: EventEnvelope, key: str) -> str:
    v = env.payload.get(key)
    return "" if v is None else str(v)


def _seconds(a: datetime, b: datetime) -> float:
    return round((b - a).total_seconds(), 3)


def _access(envs: list[EventEnvelope]) -> tuple[Control, Control]:
    logical, changes = Control("CC6.1"), Control("CC6.2/6.3")
    decisions = _of(envs, "admission.decided")
    denials = [e for e in decisions if e.payload.get("outcome") == "deny"]
    logical.figure("decisions", "Admission decisions", decisions)
    logical.figure("denials", "Denials", denials)
    logical.figure(
        "warnings", "Warnings", [e for e in decisions if e.payload.get("outcome") == "warn"]
    )
    by_policy: dict[str, list[EventEnvelope]] = defaultdict(list)
    for e in denials:
        for r in e.payload.get("reasons") or [{"policy_id": "(none)"}]:
            by_policy[str(r.get("policy_id"))].append(e)
    for policy, es in sorted(by_policy.items()):
        logical.figure(f"denials:{policy}", f"Denials by {policy}", es)
    for e in _of(envs, "api_key.issued", "api_key.revoked", *KEY_EVENTS):
        logical.record(e, f"{e.event_type} {_p(e, 'key_id')}")
    logical.figure("api_keys_issued", "API keys issued", _of(envs, "api_key.issued"))
    logical.figure("api_keys_revoked", "API keys revoked", _of(envs, "api_key.revoked"))
    logical.figure(
        "signing_keys", "Bundle signing keys registered or retired", _of(envs, *KEY_EVENTS)
    )
    for name, label, t in (
        ("users_created", "Users created", "user.created"),
        ("users_disabled", "Users disabled", "user.disabled"),
        ("roles_granted", "Roles granted", "user.role_granted"),
        ("roles_revoked", "Roles revoked", "user.role_revoked"),
        ("api_keys_issued", "API keys issued", "api_key.issued"),
        ("api_keys_revoked", "API keys revoked", "api_key.revoked"),
    ):
        changes.figure(name, label, _of(envs, t))
    for e in _of(envs, *ACCESS_EVENTS):
        who = _p(e, "user_id") or _p(e, "key_id")
        role = f" ({_p(e, 'role')})" if e.payload.get("role") else ""
        changes.record(e, f"{e.event_type} {who}{role}")
    return logical, changes


def _monitoring(envs: list[EventEnvelope]) -> Control:
    c = Control("CC7.2")
    violations = _of(envs, "policy.violation_detected")
    c.figure("violations", "Policy violations detected", violations)
    c.figure("budget_alerts", "Budget thresholds crossed", _of(envs, "budget.threshold_crossed"))
    c.figure("budget_exceeded", "Executions over budget", _of(envs, "execution.budget_exceeded"))
    c.figure("drift", "Policy drift detected", _of(envs, "policy.drift_detected"))
    by_policy: dict[str, list[EventEnvelope]] = defaultdict(list)
    for e in violations:
        by_policy[_p(e, "policy_id")].append(e)
    for policy, es in sorted(by_policy.items()):
        c.figure(f"violations:{policy}", f"Violations of {policy}", es)
    return c


def incident_lifecycles(envs: list[EventEnvelope]) -> dict[str, dict[str, EventEnvelope]]:
    """Incident id → its ``opened``, ``acknowledged`` and ``resolved`` events (those present)."""
    out: dict[str, dict[str, EventEnvelope]] = defaultdict(dict)
    for e in _of(envs, *INCIDENT_EVENTS):
        out[_p(e, "incident_id")].setdefault(e.event_type.split(".")[1], e)
    return out


def _incidents(envs: list[EventEnvelope]) -> Control:
    c = Control("CC7.3/7.4")
    life = incident_lifecycles(envs)
    opened = [x["opened"] for x in life.values() if "opened" in x]
    resolved = [x for x in life.values() if "opened" in x and "resolved" in x]
    c.figure("incidents_opened", "Incidents opened", opened)
    c.figure("incidents_acknowledged", "Incidents acknowledged", _of(envs, "incident.acknowledged"))
    c.figure("incidents_resolved", "Incidents resolved", [x["resolved"] for x in resolved])
    unresolved = [x["opened"] for x in life.values() if "opened" in x and "resolved" not in x]
    c.figure("incidents_unresolved", "Incidents open at the end of the period", unresolved)
    ttr = [_seconds(x["opened"].occurred_at, x["resolved"].occurred_at) for x in resolved]
    ids = [e for x in resolved for e in (x["opened"], x["resolved"])]
    if ttr:
        c.figure("ttr_median_s", "Median time to resolution (s)", ids, statistics.median(ttr))
        c.figure("ttr_max_s", "Longest time to resolution (s)", ids, max(ttr))
    for s in ("critical", "high", "medium", "low"):
        c.figure(
            f"incidents:{s}",
            f"{s.capitalize()} incidents",
            [e for e in opened if _p(e, "severity") == s],
        )
    for iid, x in sorted(life.items()):
        if "opened" not in x:
            continue
        o = x["opened"]
        took = (
            f"resolved after {_seconds(o.occurred_at, x['resolved'].occurred_at)} s"
            if "resolved" in x
            else "unresolved"
        )
        c.record(o, f"incident {iid} ({_p(o, 'severity')}, {_p(o, 'policy_id')}): {took}")
    for name, label, t in (
        ("freezes_started", "Promotion freezes started", "policy.freeze_started"),
        ("freezes_lifted", "Promotion freezes lifted", "policy.freeze_lifted"),
        ("freezes_overridden", "Promotion freezes overridden", "policy.freeze_overridden"),
    ):
        c.figure(name, label, _of(envs, t))
    for e in _of(envs, *FREEZE_EVENTS):
        c.record(e, f"{e.event_type} {_p(e, 'environment')}")
    return c


def _changes(envs: list[EventEnvelope]) -> Control:
    c = Control("CC8.1")
    c.figure("bundles_uploaded", "Policy bundles uploaded", _of(envs, "policy.bundle_uploaded"))
    c.figure("bundles_activated", "Policy bundles activated", _of(envs, "policy.bundle_activated"))
    for e in _of(envs, *BUNDLE_EVENTS):
        signer = _p(e, "signer_key_id") or "repository"
        c.record(
            e,
            f"{e.event_type} {_p(e, 'bundle_digest')} ({_p(e, 'environment') or 'production'}, "
            f"signed by {signer})",
        )
    for name, label, t in (
        ("promotions_requested", "Promotions requested", "promotion.requested"),
        ("promotions_approved", "Promotion approvals", "promotion.approved"),
        ("promotions_rejected", "Promotions rejected", "promotion.rejected"),
        ("promotions_executed", "Promotions executed", "promotion.executed"),
        ("exceptions_granted", "Policy exceptions granted", "policy.exception_granted"),
        ("exceptions_revoked", "Policy exceptions revoked", "policy.exception_revoked"),
        ("exceptions_expired", "Policy exceptions expired", "policy.exception_expired"),
    ):
        c.figure(name, label, _of(envs, t))
    for e in _of(envs, *PROMOTION_EVENTS):
        extra = ""
        if e.event_type == "promotion.requested":
            extra = f" diff {_p(e, 'diff_hash') or '-'} digest {_p(e, 'policy_digest')}"
        elif e.event_type == "promotion.approved":
            extra = f" by {_p(e, 'approver')} ({_p(e, 'role')})"
        c.record(e, f"{e.event_type} {_p(e, 'promotion_id')}{extra}")
    for e in _of(envs, *EXCEPTION_EVENTS):
        extra = (
            f" {_p(e, 'policy_id')} until {_p(e, 'expires_at')} by {_p(e, 'granted_by')}"
            if e.event_type == "policy.exception_granted"
            else ""
        )
        c.record(e, f"{e.event_type} {_p(e, 'exception_id')}{extra}")
    return c


def soc2_evidence(
    events: Iterable[EventEnvelope],
    period: Period,
    *,
    generated_at: datetime,
    as_of_position: int,
    checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    """The SOC2 evidence document of ``period`` (events outside it are ignored)."""
    envs = sorted((e for e in events if period.holds(e)), key=lambda e: e.position or 0)
    logical, changes = _access(envs)
    controls = [logical, changes, _monitoring(envs), _incidents(envs), _changes(envs)]
    return {
        "document": "soc2-evidence",
        "schema_version": SCHEMA_VERSION,
        "tenant_id": period.tenant,
        "period": {"from": period.start.isoformat(), "to": period.end.isoformat()},
        "generated_at": generated_at.isoformat(),
        "as_of_position": as_of_position,
        "events_considered": len(envs),
        "controls": [c.view() for c in controls],
        "checkpoint": checkpoint,
    }


def evidence_csv(doc: dict[str, Any]) -> str:
    """The evidence as CSV: one row per figure, then one per record, control by control."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for c in doc["controls"]:
        for f in c["figures"]:
            w.writerow(
                [c["control_id"], "figure", f["name"], f["value"], "", ";".join(f["event_ids"])]
            )
        for r in c["records"]:
            w.writerow(
                [
                    c["control_id"],
                    "record",
                    r["event_type"],
                    r["summary"],
                    r["occurred_at"],
                    r["event_id"],
                ]
            )
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _chart_of(control: dict[str, Any]) -> BarChart | None:
    prefix = {"CC6.1": "denials:", "CC7.2": "violations:", "CC7.3/7.4": "incidents:"}.get(
        control["control_id"]
    )
    if prefix is None:
        return None
    figs = [f for f in control["figures"] if f["name"].startswith(prefix)]
    return BarChart(
        title=f"{control['control_id']}: {prefix.rstrip(':')} by "
        + ("severity" if prefix == "incidents:" else "policy"),
        labels=tuple(f["name"][len(prefix) :] for f in figs),
        values=tuple(float(f["value"]) for f in figs),
        y_label="count",
    )


def evidence_report(doc: dict[str, Any]) -> Report:
    """The evidence as a report (for the PDF): figures with their counts, records, charts, and
    the checkpoint it was taken against; the event ids go to the appendix."""
    sections = []
    for c in doc["controls"]:
        blocks: list[Any] = [
            KeyFigures(
                tuple(
                    Figure(f["label"], _fmt(f["value"]), tuple(f["event_ids"]))
                    for f in c["figures"]
                )
            )
        ]
        chart = _chart_of(c)
        if chart is not None and chart.values:
            blocks.append(chart)
        if c["records"]:
            blocks.append(
                Table(
                    ("When", "Event", "Actor", "What"),
                    tuple(
                        (r["occurred_at"], r["event_type"], r["actor"], r["summary"])
                        for r in c["records"]
                    ),
                    caption=f"{len(c['records'])} records",
                )
            )
        sections.append(Section(f"{c['control_id']} {c['title']}", tuple(blocks)))
    cp = doc.get("checkpoint")
    cp_text = (
        f"Checkpoint {cp['seq']}: Merkle root {cp['merkle_root']} over {cp['events']} events, "
        f"signed by key {cp['key_id']} (event {cp['event_id']})."
        if cp
        else "No signed checkpoint of the event store existed when this evidence was taken."
    )
    sections.append(
        Section(
            "Integrity",
            (
                Paragraph(cp_text),
                Paragraph(
                    f"Read from the event store up to position {doc['as_of_position']}; "
                    f"{doc['events_considered']} events of the period. The file's sha256 is "
                    "signed with ed25519 in the detached signature (FILE.sig); see "
                    "docs/evidence.md for how to verify it offline."
                ),
            ),
        )
    )
    return Report(
        title="SOC2 evidence",
        subtitle=(
            f"Tenant: {doc['tenant_id']}",
            f"Period: {doc['period']['from']} to {doc['period']['to']}",
            f"Generated: {doc['generated_at']}",
        ),
        sections=tuple(sections),
    )
