"""Compliance attestations (SOC2 or ISO 27001) of a period, folded from the event store's events
(no I/O).

An attestation states what governed the tenant's agents in the period, each statement with the
events that prove it:

* the policy bundles (digests, environments, revisions, the keys that signed them) and the
  signing keys registered or retired;
* the promotions, each with its request (the policy digest and the ``diff_hash`` reviewed), its
  approvals and how it ended;
* the policy exceptions with their expiry and how they ended;
* the freeze history;
* proofs of enforcement: every denial, with the sha256 of the event's content (the hash the
  store's chain links, scheme 2) and its timestamps;
* the history: the attestations generated before this one.

The two standards hold the same evidence under their own control names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import EventEnvelope
from services.audit_replay.domain.evidence import (
    BUNDLE_EVENTS,
    EXCEPTION_EVENTS,
    FREEZE_EVENTS,
    KEY_EVENTS,
    PROMOTION_EVENTS,
    Period,
)
from services.audit_replay.reports.model import (
    Figure,
    KeyFigures,
    Paragraph,
    Report,
    Section,
    Table,
)

STANDARDS = ("soc2", "iso27001")
STANDARD_TITLES = {"soc2": "SOC 2", "iso27001": "ISO/IEC 27001:2022"}
# Section → the controls it is evidence for, per standard.
CONTROL_MAP = {
    "soc2": {
        "bundles": "CC8.1 Change management",
        "promotions": "CC8.1 Change management (approvals)",
        "exceptions": "CC6.1 Logical access (exceptions)",
        "freezes": "CC7.4 Incident response (freezes)",
        "enforcement": "CC6.1 / CC7.2 Enforcement",
    },
    "iso27001": {
        "bundles": "A.8.32 Change management",
        "promotions": "A.8.32 Change management (approvals)",
        "exceptions": "A.5.15 Access control (exceptions)",
        "freezes": "A.5.26 Response to information security incidents (freezes)",
        "enforcement": "A.8.15 Logging / A.8.16 Monitoring activities (enforcement)",
    },
}
MAX_PROOFS = 2000
ATTESTATION_EVENT = "evidence.attestation_generated"


def content_sha256(env: EventEnvelope) -> str:
    """sha256 of the event's RFC 8785 JSON (the content hash the store's chain links)."""
    return "sha256:" + hashlib.sha256(canonical_json(env.hashed_fields())).hexdigest()


def proof(env: EventEnvelope) -> dict[str, Any]:
    """An event as proof: its id, type, stream place, content hash and timestamps."""
    return {
        "event_id": str(env.event_id),
        "event_type": env.event_type,
        "stream_id": env.stream_id,
        "stream_version": env.stream_version,
        "position": env.position,
        "content_sha256": content_sha256(env),
        "occurred_at": env.occurred_at.isoformat(),
        "recorded_at": env.recorded_at.isoformat() if env.recorded_at else None,
    }


def _of(envs: list[EventEnvelope], *types: str) -> list[EventEnvelope]:
    return [e for e in envs if e.event_type in types]


def _promotions(envs: list[EventEnvelope]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in _of(envs, *PROMOTION_EVENTS):
        pid = str(e.payload.get("promotion_id"))
        p = out.setdefault(
            pid, {"promotion_id": pid, "request": None, "approvals": [], "outcome": None}
        )
        if e.event_type == "promotion.requested":
            p["request"] = {
                "agent_id": e.payload.get("agent_id"),
                "agent_version": e.payload.get("agent_version"),
                "environment": e.payload.get("environment"),
                "policy_digest": e.payload.get("policy_digest"),
                "diff_hash": e.payload.get("diff_hash"),
                "requested_by": e.payload.get("requested_by"),
                "proof": proof(e),
            }
        elif e.event_type == "promotion.approved":
            p["approvals"].append(
                {
                    "approver": e.payload.get("approver"),
                    "role": e.payload.get("role"),
                    "approved_at": e.payload.get("approved_at"),
                    "proof": proof(e),
                }
            )
        else:
            p["outcome"] = {"status": e.event_type.split(".")[1], "proof": proof(e)}
    return list(out.values())


def _exceptions(envs: list[EventEnvelope]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in _of(envs, *EXCEPTION_EVENTS):
        xid = str(e.payload.get("exception_id"))
        x = out.setdefault(xid, {"exception_id": xid, "granted": None, "ended": None})
        if e.event_type == "policy.exception_granted":
            x["granted"] = {
                "policy_id": e.payload.get("policy_id"),
                "agent_id": e.payload.get("agent_id"),
                "run_id": e.payload.get("run_id"),
                "reason": e.payload.get("reason"),
                "granted_by": e.payload.get("granted_by"),
                "expires_at": e.payload.get("expires_at"),
                "proof": proof(e),
            }
        else:
            x["ended"] = {"how": e.event_type.split("_")[-1], "proof": proof(e)}
    return list(out.values())


def attestation(
    events: Iterable[EventEnvelope],
    period: Period,
    *,
    standard: str,
    attestation_id: str,
    generated_at: datetime,
    as_of_position: int,
    checkpoint: dict[str, Any] | None,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The attestation document of ``period`` under ``standard``."""
    envs = sorted((e for e in events if period.holds(e)), key=lambda e: e.position or 0)
    denials = [
        e
        for e in envs
        if e.event_type == "admission.decided" and e.payload.get("outcome") == "deny"
    ]
    return {
        "document": "compliance-attestation",
        "standard": standard,
        "attestation_id": attestation_id,
        "tenant_id": period.tenant,
        "period": {"from": period.start.isoformat(), "to": period.end.isoformat()},
        "generated_at": generated_at.isoformat(),
        "as_of_position": as_of_position,
        "controls": CONTROL_MAP[standard],
        "policy_bundles": [
            {
                "event_type": e.event_type,
                "bundle_digest": e.payload.get("bundle_digest"),
                "environment": e.payload.get("environment") or "production",
                "revision": e.payload.get("revision"),
                "signer_key_id": e.payload.get("signer_key_id"),
                "proof": proof(e),
            }
            for e in _of(envs, *BUNDLE_EVENTS)
        ],
        "signing_keys": [
            {"event_type": e.event_type, "key_id": e.payload.get("key_id"), "proof": proof(e)}
            for e in _of(envs, *KEY_EVENTS)
        ],
        "promotions": _promotions(envs),
        "exceptions": _exceptions(envs),
        "freezes": [
            {
                "event_type": e.event_type,
                "environment": e.payload.get("environment"),
                "incident_id": e.payload.get("incident_id") or e.payload.get("incident_ids"),
                "proof": proof(e),
            }
            for e in _of(envs, *FREEZE_EVENTS)
        ],
        "enforcement": {
            "denials": len(denials),
            "proofs": [
                {
                    **proof(e),
                    "decision_id": e.payload.get("decision_id"),
                    "policy_ids": [r.get("policy_id") for r in e.payload.get("reasons") or []],
                }
                for e in denials[:MAX_PROOFS]
            ],
            "proofs_listed": min(len(denials), MAX_PROOFS),
        },
        "checkpoint": checkpoint,
        "history": history,
    }


def _short(h: str | None) -> str:
    return (h or "-")[:23]


def attestation_report(doc: dict[str, Any]) -> Report:
    """The attestation as a report (for the PDF)."""
    c = doc["controls"]
    bundles = Table(
        ("When", "Event", "Digest", "Env", "Signed by", "Content sha256"),
        tuple(
            (
                b["proof"]["occurred_at"],
                b["event_type"],
                str(b["bundle_digest"]),
                b["environment"],
                str(b["signer_key_id"] or "repository"),
                _short(b["proof"]["content_sha256"]),
            )
            for b in doc["policy_bundles"]
        ),
    )
    promotions = Table(
        ("Promotion", "Diff hash", "Policy digest", "Approvals", "Outcome"),
        tuple(
            (
                p["promotion_id"],
                _short((p["request"] or {}).get("diff_hash")),
                str((p["request"] or {}).get("policy_digest") or "-"),
                "; ".join(f"{a['approver']} ({a['role']})" for a in p["approvals"]) or "-",
                (p["outcome"] or {}).get("status", "pending"),
            )
            for p in doc["promotions"]
        ),
    )
    exceptions = Table(
        ("Exception", "Policy", "Granted by", "Expires", "Ended"),
        tuple(
            (
                x["exception_id"],
                str((x["granted"] or {}).get("policy_id") or "-"),
                str((x["granted"] or {}).get("granted_by") or "-"),
                str((x["granted"] or {}).get("expires_at") or "-"),
                (x["ended"] or {}).get("how", "-"),
            )
            for x in doc["exceptions"]
        ),
    )
    freezes = Table(
        ("When", "Event", "Environment", "Incident"),
        tuple(
            (
                f["proof"]["occurred_at"],
                f["event_type"],
                str(f["environment"]),
                str(f["incident_id"]),
            )
            for f in doc["freezes"]
        ),
    )
    enf = doc["enforcement"]
    proofs = Table(
        ("Recorded", "Decision", "Policies", "Content sha256"),
        tuple(
            (
                str(p["recorded_at"]),
                str(p["decision_id"]),
                ", ".join(str(x) for x in p["policy_ids"]),
                _short(p["content_sha256"]),
            )
            for p in enf["proofs"]
        ),
    )
    history = Table(
        ("Attestation", "Standard", "Period", "Generated", "JSON sha256"),
        tuple(
            (
                h["attestation_id"],
                h["standard"],
                f"{h['period_from']} to {h['period_to']}",
                h["generated_at"],
                _short(h["json_sha256"]),
            )
            for h in doc["history"]
        ),
    )
    cp = doc.get("checkpoint")
    return Report(
        title=f"Compliance attestation: {STANDARD_TITLES[doc['standard']]}",
        subtitle=(
            f"Tenant: {doc['tenant_id']}",
            f"Period: {doc['period']['from']} to {doc['period']['to']}",
            f"Attestation: {doc['attestation_id']}, generated {doc['generated_at']}",
        ),
        sections=(
            Section(
                "Summary",
                (
                    KeyFigures(
                        (
                            Figure("Policy bundle events", str(len(doc["policy_bundles"]))),
                            Figure("Promotions", str(len(doc["promotions"]))),
                            Figure("Policy exceptions", str(len(doc["exceptions"]))),
                            Figure("Freeze events", str(len(doc["freezes"]))),
                            Figure("Denials enforced", str(enf["denials"])),
                            Figure("Earlier attestations", str(len(doc["history"]))),
                        )
                    ),
                ),
            ),
            Section(f"{c['bundles']}: policy digests and signatures", (bundles,)),
            Section(f"{c['promotions']}: approvals and diffs", (promotions,)),
            Section(f"{c['exceptions']}: exceptions and expiry", (exceptions,)),
            Section(f"{c['freezes']}: freeze history", (freezes,)),
            Section(
                f"{c['enforcement']}: proofs of enforcement",
                (
                    Paragraph(
                        f"{enf['denials']} denials; {enf['proofs_listed']} listed with the sha256 "
                        "of their content (the hash the event store's chain links) and their "
                        "timestamps."
                    ),
                    proofs,
                ),
            ),
            Section("Attestation history", (history,)),
            Section(
                "Integrity",
                (
                    Paragraph(
                        f"Checkpoint {cp['seq']}: Merkle root {cp['merkle_root']}, signed by key "
                        f"{cp['key_id']}."
                        if cp
                        else "No signed checkpoint of the event store existed yet."
                    ),
                    Paragraph(
                        "The file's sha256 is signed with ed25519 (FILE.sig); see "
                        "docs/evidence.md to verify it offline."
                    ),
                ),
            ),
        ),
    )
