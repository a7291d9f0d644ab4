"""Policy hooks: the interpretation of a hook's decision, every hook through the repository's
bundle (regopy), the batch scan, and policy exceptions on the after_execute path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.contracts.events import PolicyHookEvaluated, StepRecorded
from libs.domain.run import RunState
from libs.errors import InvalidInput, PermanentError
from services.policy_admission.bundle import PolicyBundle, load_bundle
from services.policy_admission.domain import RunContext
from services.policy_admission.exceptions import Waiver
from services.policy_admission.hooks import (
    HOOKS,
    Evaluated,
    HookActor,
    HookContext,
    after_execute_context,
    evaluate_hook,
    evaluate_scan,
    hook_events,
    interpret_hook,
    parse_after_execute,
    parse_hook,
    subject_of,
    waive_hook,
    worst,
)

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "a" * 64
RUNBOOK = "https://example.test/runbooks/x.md"
ACTOR = HookActor(id="user:ana", roles=["operator"], human=True)
GOOD_AGENT: dict[str, Any] = {
    "id": "agent-1",
    "identity": {"owner": "team-a"},
    "model": {"name": "gpt-4o"},
    "tools": ["search"],
    "memory": {"retention_days": 7},
    "limits": {"max_steps_per_run": 50},
}


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return load_bundle()


def _reason(policy_id: str, severity: str = "high", message: str = "m") -> dict[str, Any]:
    return {
        "policy_id": policy_id,
        "severity": severity,
        "message": message,
        "runbook_url": RUNBOOK,
    }


def _ctx(hook: str, **fields: Any) -> HookContext:
    return HookContext(hook=parse_hook(hook), actor=ACTOR, **fields)


# --- interpretation ------------------------------------------------------------------------------


def test_an_undefined_hook_decision_allows() -> None:
    decision = interpret_hook("on_review_open", None, DIGEST)
    assert decision.outcome == "allow"
    assert decision.violations == decision.warnings == []
    assert decision.bundle_digest == DIGEST


def test_interpretation_orders_reasons_and_picks_the_outcome() -> None:
    raw = {
        "deny": [_reason("b", "medium"), _reason("a", "critical")],
        "warn": [_reason("w", "low")],
        "locked_fields": [
            {"field": "limits", "policy_id": "g", "message": "x"},
            {"field": "limits", "policy_id": "g", "message": "x"},
            {"field": "identity.owner", "policy_id": "g"},
        ],
        "mutations": [
            {"op": "replace", "path": "model.name", "value": "m2", "policy_id": "d"},
            {"op": "replace", "path": "memory.retention_days", "value": 30, "policy_id": "r"},
        ],
    }
    decision = interpret_hook("on_create_attempt", raw, DIGEST)
    assert decision.outcome == "deny"
    assert [r.policy_id for r in decision.violations] == ["a", "b"]
    assert [r.policy_id for r in decision.warnings] == ["w"]
    assert [lock.field for lock in decision.locked_fields] == ["identity.owner", "limits"]
    assert [m.path for m in decision.mutations] == ["memory.retention_days", "model.name"]
    assert decision.as_answer()["runbooks"] == [RUNBOOK]


def test_warnings_alone_warn_and_mutations_alone_allow() -> None:
    assert interpret_hook("on_review_open", {"warn": [_reason("w")]}, DIGEST).outcome == "warn"
    mutation = {"op": "add", "path": "limits.x", "value": 1, "policy_id": "p"}
    assert interpret_hook("on_review_open", {"mutations": [mutation]}, DIGEST).outcome == "allow"


@pytest.mark.parametrize(
    "raw",
    [
        {"deny": "not a list"},
        {"locked_fields": [{"field": "x"}]},
        {"mutations": [{"op": "explode", "path": "x", "policy_id": "p"}]},
        {"warn": [{"policy_id": "p", "severity": "urgent", "message": "m"}]},
    ],
)
def test_a_malformed_hook_decision_is_the_bundles_fault(raw: dict[str, Any]) -> None:
    with pytest.raises(PermanentError):
        interpret_hook("on_create_attempt", raw, DIGEST)


def test_an_unknown_hook_is_named() -> None:
    with pytest.raises(InvalidInput, match="hook_unknown: no policy hook 'on_lunch'"):
        parse_hook("on_lunch")
    assert [parse_hook(h) for h in HOOKS] == list(HOOKS)


def test_worst_outcome() -> None:
    assert worst(["allow", "warn", "allow"]) == "warn"
    assert worst(["warn", "deny"]) == "deny"
    assert worst([]) == "allow"


# --- every hook through the repository's bundle --------------------------------------------------


def test_on_create_attempt_denies_an_agent_without_owner_and_suggests_mutations(
    bundle: PolicyBundle,
) -> None:
    agent = {**GOOD_AGENT, "identity": {}, "model": {"name": "gpt-4"}}
    decision = evaluate_hook(bundle, _ctx("on_create_attempt", agent=agent), tenant_id="t")
    assert decision.outcome == "deny"
    assert [r.policy_id for r in decision.violations] == ["agent_owner"]
    assert [r.policy_id for r in decision.warnings] == ["model_deprecation"]
    assert [(m.path, m.value) for m in decision.mutations] == [("model.name", "gpt-4o")]
    assert {lock.field for lock in decision.locked_fields} == {
        "identity.owner",
        "limits",
        "policies",
    }
    assert decision.bundle_digest == bundle.digest
    assert all(r.runbook_url and r.runbook_url.endswith(".md") for r in decision.violations)


def test_on_create_attempt_allows_a_good_agent(bundle: PolicyBundle) -> None:
    decision = evaluate_hook(bundle, _ctx("on_create_attempt", agent=GOOD_AGENT), tenant_id="t")
    assert (decision.outcome, decision.violations, decision.warnings) == ("allow", [], [])


def test_on_review_open_locks_governed_fields_and_denies_a_change_to_them(
    bundle: PolicyBundle,
) -> None:
    change = {"fields": ["limits.max_steps_per_run"]}
    ctx = _ctx("on_review_open", agent=GOOD_AGENT, change=change)
    decision = evaluate_hook(bundle, ctx, tenant_id="t")
    assert [r.policy_id for r in decision.violations] == ["governed_fields"]
    admin = ctx.model_copy(update={"actor": HookActor(id="user:root", roles=["admin"])})
    assert evaluate_hook(bundle, admin, tenant_id="t").outcome == "allow"


def test_on_promotion_attempt_needs_tests_and_validation_in_production(
    bundle: PolicyBundle,
) -> None:
    ctx = _ctx("on_promotion_attempt", agent=GOOD_AGENT, request={"tests_passed": True})
    decision = evaluate_hook(bundle, ctx, tenant_id="t")
    assert [r.policy_id for r in decision.violations] == ["promotion_checks"]
    passed = ctx.model_copy(update={"request": {"tests_passed": True, "validation_passed": True}})
    assert evaluate_hook(bundle, passed, tenant_id="t").outcome == "allow"
    sandbox = ctx.model_copy(update={"environment": "sandbox"})
    assert evaluate_hook(bundle, sandbox, tenant_id="t").outcome == "allow"


def test_tenant_settings_reach_the_hooks(bundle: PolicyBundle) -> None:
    ctx = _ctx("on_create_attempt", agent=GOOD_AGENT)
    assert evaluate_hook(bundle, ctx, tenant_id="t").outcome == "allow"
    strict = evaluate_hook(bundle, ctx, tenant_id="t", settings={"max_memory_retention_days": 3})
    assert [r.policy_id for r in strict.violations] == ["memory_retention"]


def test_before_execute_is_the_admission_decision(bundle: PolicyBundle) -> None:
    run = {"run_id": "r1", "status": "running", "tokens_used": 9900, "cost_usd": 0, "violated": []}
    step = {
        "index": 2,
        "kind": "llm_call",
        "model": "gpt-4o",
        "tool": None,
        "estimate": {"input_tokens": 100, "max_output_tokens": 100, "cost_usd": 0.01},
    }
    ctx = _ctx("before_execute", request={"run": run, "step": step})
    decision = evaluate_hook(bundle, ctx, tenant_id="t")
    assert [r.policy_id for r in decision.violations] == ["token_limit"]
    admitted = bundle.evaluate({"tenant_id": "t", "run": run, "step": step})
    assert [r.message for r in decision.violations] == [e["message"] for e in admitted["deny"]]
    with pytest.raises(InvalidInput, match=r"before_execute needs request\.run"):
        evaluate_hook(bundle, _ctx("before_execute", request={"step": step}))


def test_on_policy_update_scans_every_subject(bundle: PolicyBundle) -> None:
    subjects = [
        {"id": "good", "agent": GOOD_AGENT},
        {"id": "ownerless", "agent": {**GOOD_AGENT, "identity": {}}},
        {"id": "old-model", "agent": {**GOOD_AGENT, "model": {"name": "gpt-3.5-turbo"}}},
    ]
    scanned = evaluate_scan(
        bundle, _ctx("on_policy_update", request={"subjects": subjects}), tenant_id="t"
    )
    assert [(s, d.outcome) for s, d in scanned] == [
        ("good", "allow"),
        ("ownerless", "deny"),
        ("old-model", "warn"),
    ]
    with pytest.raises(InvalidInput, match=r"request\.subjects"):
        evaluate_scan(bundle, _ctx("on_policy_update", request={"subjects": []}))


# --- after_execute and policy exceptions ---------------------------------------------------------

EXPIRES = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def _step(input_tokens: int, output_tokens: int = 0) -> StepRecorded:
    return StepRecorded(
        run_id="r1",
        agent_id="agent-1",
        step_index=3,
        model="gpt-4o",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def _waiver(**fields: Any) -> Waiver:
    base: dict[str, Any] = {
        "exception_id": "ex-1",
        "policy_id": "run_budget_actual",
        "agent_id": "agent-1",
        "run_id": None,
        "reason": "load test",
        "granted_by": "user:admin",
        "granted_at": EXPIRES - timedelta(hours=1),
        "expires_at": EXPIRES,
    }
    return Waiver(**{**base, **fields})


def _over_budget(bundle: PolicyBundle) -> Any:
    run = RunContext(
        tenant_id="t",
        run_id="r1",
        run=RunState(
            tenant_id="t",
            run_id="r1",
            agent_id="agent-1",
            status="running",
            version=3,
            steps=frozenset({1, 2, 3}),
            last_step_index=3,
            tokens_used=12000,
        ),
    )
    ctx = after_execute_context(
        _ctx("after_execute", request={"run_id": "r1", "step_index": 3}), run, _step(11000)
    )
    return evaluate_hook(bundle, ctx, tenant_id="t")


def test_after_execute_judges_what_the_step_really_used(bundle: PolicyBundle) -> None:
    decision = _over_budget(bundle)
    assert decision.outcome == "deny"
    assert [r.policy_id for r in decision.violations] == ["run_budget_actual"]
    assert "12000 tokens" in decision.violations[0].message


@pytest.mark.parametrize(
    ("at", "outcome"),
    [
        (EXPIRES - timedelta(seconds=1), "warn"),
        (EXPIRES - timedelta(microseconds=1), "warn"),
        (EXPIRES, "deny"),
        (EXPIRES + timedelta(seconds=1), "deny"),
    ],
)
def test_after_execute_honours_an_exception_until_the_second_it_expires(
    bundle: PolicyBundle, at: datetime, outcome: str
) -> None:
    decision = waive_hook(_over_budget(bundle), [_waiver()], agent_id="agent-1", run_id="r1", at=at)
    assert decision.outcome == outcome
    assert decision.exceptions == (["ex-1"] if outcome == "warn" else [])
    assert [r.policy_id for r in decision.violations] == ["run_budget_actual"]


@pytest.mark.parametrize(
    "waiver",
    [
        _waiver(status="revoked"),
        _waiver(status="expired"),
        _waiver(policy_id="token_limit"),
        _waiver(agent_id="agent-2"),
        _waiver(agent_id=None, run_id="r2"),
    ],
)
def test_after_execute_ignores_an_exception_that_does_not_cover_it(
    bundle: PolicyBundle, waiver: Waiver
) -> None:
    at = EXPIRES - timedelta(minutes=1)
    decision = waive_hook(_over_budget(bundle), [waiver], agent_id="agent-1", run_id="r1", at=at)
    assert decision.outcome == "deny"


def test_after_execute_request_is_validated() -> None:
    with pytest.raises(InvalidInput, match=r"request\.step_index"):
        parse_after_execute(_ctx("after_execute", request={"run_id": "r1"}))
    assert parse_after_execute(_ctx("after_execute", request={"run_id": "r1", "step_index": 2}))


# --- the record ----------------------------------------------------------------------------------


def test_hook_events_carry_the_decision_and_the_bundle_digest(bundle: PolicyBundle) -> None:
    ctx = _ctx("on_create_attempt", agent={**GOOD_AGENT, "identity": {}})
    decision = evaluate_hook(bundle, ctx, tenant_id="t")
    [event] = hook_events(
        [Evaluated(subject_of(ctx), decision)], decision_id="d1", environment="sandbox"
    )
    assert isinstance(event, PolicyHookEvaluated)
    assert (event.subject, event.hook, event.outcome) == ("agent-1", "on_create_attempt", "deny")
    assert event.bundle_digest == bundle.digest and event.environment == "sandbox"
    assert event.violations == decision.violations


def test_subject_names_the_agent_or_the_run() -> None:
    assert subject_of(_ctx("on_review_open", agent={"identity": {"name": "bot"}})) == "bot"
    assert subject_of(_ctx("on_review_open")) == "unnamed"
    after = _ctx("after_execute", request={"run_id": "r9", "step_index": 1}, agent={"id": "a"})
    assert subject_of(after) == "r9"
