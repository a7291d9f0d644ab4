"""Chaos cases for the policy engine (non-production only, ``POST /v1/policy-chaos``): each one
breaks something on purpose, beside the tenant's live bundle, and checks that the engine keeps
deciding with the last good one. Pure CPU work on copies (run it off the event loop); nothing is
swapped, appended or expired but the one ``policy.chaos_ran`` event that records the case.

* ``partial_reload_failure``: the repository's bundle with one file that does not compile is
  loaded as a reload would load it; the load must fail and the deciding bundle stay.
* ``conflicting_policies``: the bundle with two rules injected that give one decision two values;
  it compiles, its evaluation must fail, and the deciding bundle must still decide.
* ``expiry_storm``: 10,000 policy exceptions expiring in the same second, matched as a decision
  matches them: every one applies a microsecond before that second, none at it, and the sweep
  closes all of them in one pass.
* ``agent_load``: :data:`AGENT_LOAD` agents, each a fresh run asking for its first step with
  varied models and tools, decided one after another by the deciding bundle as admission would:
  every one must get a decision (no evaluation error), and the probe must decide as it did before.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from libs import policy_bundles as artifacts
from libs.contracts.events import Reason
from libs.pricing import builtin_price_table
from services.policy_admission import exceptions as waivers
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR, BundleError, PolicyBundle
from services.policy_admission.domain import AdmitRequest, RunContext, build_input, interpret

Case = Literal["partial_reload_failure", "conflicting_policies", "expiry_storm", "agent_load"]
CASES: tuple[Case, ...] = (
    "partial_reload_failure",
    "conflicting_policies",
    "expiry_storm",
    "agent_load",
)
STORM_SIZE = 10_000
AGENT_LOAD = 2_000
"""How many agents the ``agent_load`` case simulates, each with a run asking for its first step."""
BROKEN_FILE = "policies/chaos_broken.rego"


def probe_input(tenant_id: str, at: datetime) -> dict[str, Any]:
    """A decision's input for a fresh run's first step (the probe every case decides)."""
    context = RunContext(tenant_id, "chaos-probe")
    request = AdmitRequest.model_validate(
        {
            "run_id": "chaos-probe",
            "step_index": 1,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10},
        }
    )
    return build_input(context, request, prices=builtin_price_table(), at=at)


def _decides(bundle: PolicyBundle, input_doc: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    decision = interpret(bundle.evaluate(input_doc))
    return {
        "deciding_digest": bundle.digest,
        "probe_outcome": decision.outcome,
        "probe_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def _repository_files() -> dict[str, bytes]:
    files = artifacts.directory_files(DEFAULT_BUNDLE_DIR, revision="1")
    return {k: v for k, v in files.items() if not k.startswith("tests/")}


def _compile(files: dict[str, bytes]) -> PolicyBundle:
    modules, _ = artifacts.content_of(files)
    return PolicyBundle(Path("chaos"), modules, digest="chaos")


def partial_reload_failure(deciding: PolicyBundle, input_doc: dict[str, Any]) -> dict[str, Any]:
    """One bad file in an otherwise good bundle: the load fails, the deciding bundle stays."""
    files = _repository_files()
    files[BROKEN_FILE] = b"package missioncontrol.chaos\n\nbroken := {\n"
    try:
        _compile(files)
    except BundleError as exc:
        refused = str(exc)[:300]
    else:  # pragma: no cover - a syntax error always fails to compile
        return {"kept_deciding": False, "detail": "the bundle with a bad file compiled"}
    return {"kept_deciding": True, "load_refused": refused, **_decides(deciding, input_doc)}


def conflicting_policies(deciding: PolicyBundle, input_doc: dict[str, Any]) -> dict[str, Any]:
    """Two rules giving one decision two values: the candidate fails, the deciding one decides."""
    files = _repository_files()
    main = files["policies/main.rego"].decode()
    anchor = "decision := {"
    if anchor not in main:  # pragma: no cover - the repository's main module defines it
        return {"kept_deciding": False, "detail": "no decision rule to inject into"}
    injected = 'chaos_conflict := "allow" if input.step\nchaos_conflict := "deny" if input.step\n\n'
    files["policies/main.rego"] = main.replace(
        anchor, injected + anchor + '\n\t"chaos": chaos_conflict,', 1
    ).encode()
    candidate = _compile(files)
    try:
        candidate.evaluate(input_doc)
    except BundleError as exc:
        failed = str(exc)[:300]
    else:
        return {"kept_deciding": False, "detail": "the conflicting rules evaluated"}
    return {"kept_deciding": True, "candidate_failed": failed, **_decides(deciding, input_doc)}


def expiry_storm(
    deciding: PolicyBundle, input_doc: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """:data:`STORM_SIZE` exceptions expiring in one second, matched and swept."""
    second = now.replace(microsecond=0) + timedelta(seconds=1)
    storm = tuple(
        waivers.Waiver(
            exception_id=f"chaos-{i}",
            policy_id="token_limit",
            agent_id=None,
            run_id=f"chaos-run-{i}",
            reason="chaos: expiry storm",
            granted_by="chaos",
            granted_at=now,
            expires_at=second,
        )
        for i in range(STORM_SIZE)
    )
    deny = [Reason(policy_id="token_limit", severity="high", message="chaos")]
    last = f"chaos-run-{STORM_SIZE - 1}"
    started = time.perf_counter()
    before = waivers.waiving(
        storm, deny, agent_id=None, run_id=last, at=second - timedelta(microseconds=1)
    )
    at = waivers.waiving(storm, deny, agent_id=None, run_id=last, at=second)
    match_ms = (time.perf_counter() - started) * 1000 / 2
    started = time.perf_counter()
    expired = waivers.expire(waivers.Exceptions(storm), second)
    sweep_ms = (time.perf_counter() - started) * 1000
    ok = before == (f"chaos-{STORM_SIZE - 1}",) and at is None and len(expired) == STORM_SIZE
    return {
        "kept_deciding": ok,
        "exceptions": STORM_SIZE,
        "expires_at": second.isoformat(),
        "applied_before_expiry": before is not None,
        "applied_at_expiry": at is not None,
        "expired_in_one_sweep": len(expired),
        "match_ms": round(match_ms, 3),
        "sweep_ms": round(sweep_ms, 3),
        **_decides(deciding, input_doc),
    }


_LOAD_MODELS = ("gpt-4o", "claude-sonnet-4", "gpt-4o-mini", "no-such-model")
_LOAD_TOOLS = (None, "search", "http_request", "shell")


def agent_load(deciding: PolicyBundle, input_doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    """:data:`AGENT_LOAD` agents' first steps decided in a row; every one decided, none failed."""
    before = _decides(deciding, input_doc)
    outcomes: dict[str, int] = {"allow": 0, "warn": 0, "deny": 0}
    failed = 0
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(AGENT_LOAD):
        request = AdmitRequest.model_validate(
            {
                "run_id": f"chaos-load-{i}",
                "step_index": 1,
                "model": _LOAD_MODELS[i % len(_LOAD_MODELS)],
                "tool": _LOAD_TOOLS[(i // len(_LOAD_MODELS)) % len(_LOAD_TOOLS)],
                "estimate": {"input_tokens": 100 + i % 900, "max_output_tokens": 200},
            }
        )
        doc = build_input(
            RunContext(str(input_doc["tenant_id"]), f"chaos-load-{i}"),
            request,
            prices=builtin_price_table(),
            at=now,
        )
        # A run that started, of its own agent (a run that never started is denied by
        # run_state whatever else it asks, which would hide the other policies' work).
        doc["run"].update(agent_id=f"chaos-agent-{i}", status="running")
        one = time.perf_counter()
        try:
            outcomes[interpret(deciding.evaluate(doc)).outcome] += 1
        except BundleError:
            failed += 1
        latencies.append(time.perf_counter() - one)
    elapsed = time.perf_counter() - started
    after = _decides(deciding, input_doc)
    latencies.sort()
    return {
        "kept_deciding": failed == 0 and after["probe_outcome"] == before["probe_outcome"],
        "agents": AGENT_LOAD,
        "decided": sum(outcomes.values()),
        "failed": failed,
        "outcomes": outcomes,
        "decisions_per_s": round(AGENT_LOAD / elapsed, 1),
        "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 3),
        **after,
    }


def run_case(case: Case, deciding: PolicyBundle, tenant_id: str, now: datetime) -> dict[str, Any]:
    """Run one case against ``deciding`` (the tenant's bundle in the environment); the figures,
    with ``kept_deciding``."""
    input_doc = probe_input(tenant_id, now)
    if case == "partial_reload_failure":
        return partial_reload_failure(deciding, input_doc)
    if case == "conflicting_policies":
        return conflicting_policies(deciding, input_doc)
    if case == "agent_load":
        return agent_load(deciding, input_doc, now)
    return expiry_storm(deciding, input_doc, now)
