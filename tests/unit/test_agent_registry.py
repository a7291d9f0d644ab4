"""The agent registry's pure core: every lifecycle transition, immutability of governed versions,
version bumps on fork and promote, idempotent autosave, validation and the admission gate."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.contracts.agents import spec_hash
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AgentDisabled,
    AgentDraftSaved,
    AgentForked,
    AgentPromoted,
    AgentSandboxed,
    AgentValidated,
)
from libs.contracts.policy import policy_set_hash
from libs.errors import Conflict, InvalidInput, NotFound
from services.policy_admission import agents
from services.policy_admission.agents import (
    AGENT_STATE_POLICY,
    Agent,
    PolicyView,
    admission_denial,
    validate_agent,
)
from services.policy_admission.domain import interpret
from services.policy_admission.exceptions import Exceptions, grant

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64

SPEC: dict[str, Any] = {
    "identity": {"name": "Reviewer", "tags": ["code"]},
    "role": "Reviews pull requests",
    "model": {"model": "gpt-4o-mini", "provider": "openai"},
    "tools": [{"name": "search"}],
    "limits": {"max_tokens_per_run": 5000},
}


def policy(environment: str = "sandbox", **settings: Any) -> PolicyView:
    return PolicyView(
        tenant_id="acme",
        environment=environment,  # type: ignore[arg-type]
        policy_digest=DIGEST,
        policy_set_hash=policy_set_hash(DIGEST, settings or None, ()),
        data={"missioncontrol": {"config": {"defaults": {"max_tokens_per_run": 10000}}}},
        settings=settings or None,
    )


def apply(agent: Agent, events: Sequence[DomainEvent]) -> Agent:
    for e in events:
        agent = agents.evolve(agent, e, AT)
    return agent


def drafted(spec: dict[str, Any] | None = None) -> Agent:
    new = Agent(agent_id="reviewer")
    return apply(new, agents.save_draft(new, spec or SPEC, origin="template", origin_ref="t1"))


def sandboxed() -> Agent:
    agent = drafted()
    return apply(agent, agents.sandbox(agent, validate_agent(agent.spec, policy())))


def governed() -> Agent:
    agent = sandboxed()
    verdict = validate_agent(agent.spec, policy("production"))
    return apply(agent, agents.promote(agent, verdict, "user:admin"))


# --- drafts --------------------------------------------------------------------------------------


def test_the_first_draft_creates_version_1_and_records_its_origin() -> None:
    events = agents.save_draft(Agent(agent_id="reviewer"), SPEC, origin="clone", origin_ref="x")
    assert len(events) == 1 and isinstance(events[0], AgentDraftSaved)
    agent = apply(Agent(agent_id="reviewer"), events)
    assert (agent.version, agent.state, agent.lifecycle) == (1, "draft", "draft")
    assert (agent.origin, agent.origin_ref) == ("clone", "x")
    assert agent.spec_hash == spec_hash(SPEC)


def test_autosave_of_the_same_content_records_nothing_whatever_the_key_order() -> None:
    agent = drafted()
    reordered = dict(reversed(list(SPEC.items())))
    assert agents.save_draft(agent, reordered, origin=None, origin_ref=None) == []
    changed = agents.save_draft(
        agent, {**SPEC, "role": "Reviews code"}, origin=None, origin_ref=None
    )
    assert len(changed) == 1
    after = apply(agent, changed)
    assert after.version == 1 and after.origin == "template"  # origin is kept from creation


def test_a_partial_draft_is_saved_and_an_unknown_section_is_named() -> None:
    agent = drafted({"identity": {"name": "half"}})
    assert agent.exists
    with pytest.raises(
        InvalidInput, match=r"agent_draft_invalid: unknown spec section\(s\) 'colour'"
    ):
        agents.save_draft(agent, {"colour": "red"}, origin=None, origin_ref=None)
    with pytest.raises(InvalidInput, match="agent_draft_invalid: spec must be a JSON object"):
        agents.save_draft(agent, ["not", "an", "object"], origin=None, origin_ref=None)
    with pytest.raises(InvalidInput, match="over the 65,536 allowed"):
        agents.save_draft(agent, {"role": "x" * 70_000}, origin=None, origin_ref=None)


def test_saving_a_sandboxed_version_takes_it_back_to_draft() -> None:
    agent = sandboxed()
    after = apply(
        agent, agents.save_draft(agent, {**SPEC, "role": "new"}, origin=None, origin_ref=None)
    )
    assert (after.version, after.state, after.sandboxed) == (1, "draft", None)


# --- validation ----------------------------------------------------------------------------------


def test_validation_names_every_missing_and_invalid_field() -> None:
    verdict = validate_agent({"identity": {"name": ""}, "model": {"model": "m"}}, policy())
    assert not verdict.passed
    found = {(p.code, p.path) for p in verdict.problems}
    assert ("schema_missing", "role") in found
    assert ("schema_invalid", "identity.name") in found


def test_validation_checks_the_tenant_allowlists_and_limits() -> None:
    strict = policy(
        model_allowlist=["claude-3-haiku"], tool_allowlist=["browse"], max_tokens_per_run=1000
    )
    verdict = validate_agent(SPEC, strict)
    assert not verdict.passed
    assert {(p.code, p.path) for p in verdict.problems} == {
        ("model_not_allowed", "model.model"),
        ("tool_not_allowed", "tools.0.name"),
        ("limit_above_tenant", "limits.max_tokens_per_run"),
    }
    ok = validate_agent(SPEC, policy(model_allowlist=["gpt-4o-mini"], tool_allowlist=[]))
    assert ok.passed and ok.problems == ()
    assert ok.policy_digest == DIGEST and ok.policy_set_hash.startswith("sha256:")


def test_the_bundle_data_limit_applies_when_the_tenant_set_none() -> None:
    verdict = validate_agent({**SPEC, "limits": {"max_tokens_per_run": 20000}}, policy())
    assert [p.code for p in verdict.problems] == ["limit_above_tenant"]


def test_a_validation_is_recorded_once_per_spec_and_policy_set() -> None:
    agent = drafted()
    verdict = validate_agent(agent.spec, policy())
    events = agents.record_validation(agent, verdict)
    assert isinstance(events[0], AgentValidated)
    assert events[0].policy_digest == DIGEST
    assert events[0].policy_set_hash == verdict.policy_set_hash
    agent = apply(agent, events)
    assert agents.record_validation(agent, verdict) == []
    other = validate_agent(agent.spec, policy(model_allowlist=["gpt-4o-mini"]))
    assert len(agents.record_validation(agent, other)) == 1


def test_validating_an_unknown_agent_is_not_found() -> None:
    with pytest.raises(NotFound, match="agent_not_found"):
        agents.record_validation(Agent(agent_id="ghost"), validate_agent(SPEC, policy()))


# --- transitions ---------------------------------------------------------------------------------


def test_sandbox_needs_a_passing_validation_and_records_the_policy_set() -> None:
    agent = drafted()
    with pytest.raises(InvalidInput, match=r"agent_invalid: .*model_not_allowed"):
        agents.sandbox(agent, validate_agent(agent.spec, policy(model_allowlist=["other"])))
    events = agents.sandbox(agent, validate_agent(agent.spec, policy()))
    assert [type(e) for e in events] == [AgentValidated, AgentSandboxed]
    after = apply(agent, events)
    assert (after.version, after.state) == (1, "sandbox")
    assert after.sandboxed == (DIGEST, policy().policy_set_hash)
    assert agents.sandbox(after, validate_agent(after.spec, policy())) == []  # again: nothing


def test_promote_bumps_the_version_and_makes_it_governed() -> None:
    agent = sandboxed()
    events = agents.promote(agent, validate_agent(agent.spec, policy("production")), "user:a")
    promoted = [e for e in events if isinstance(e, AgentPromoted)]
    assert len(promoted) == 1
    assert (promoted[0].from_version, promoted[0].version) == (1, 2)
    after = apply(agent, events)
    assert (after.version, after.state) == (2, "governed")
    assert after.governed is not None and after.governed.version == 2
    assert after.governed.policy_digest == DIGEST
    assert after.state_in("production") == "governed" and after.version_in("production") == 2
    assert agents.promote(after, validate_agent(after.spec, policy("production")), "u") == []


def test_promote_refuses_a_draft_and_a_failing_production_policy() -> None:
    with pytest.raises(Conflict, match="agent_illegal_transition: cannot promote"):
        agents.promote(drafted(), validate_agent(SPEC, policy("production")), "u")
    agent = sandboxed()
    with pytest.raises(InvalidInput, match="agent_invalid"):
        agents.promote(agent, validate_agent(agent.spec, policy(model_allowlist=["o"])), "u")


def test_a_governed_version_is_immutable_fork_opens_the_next_version() -> None:
    agent = governed()
    with pytest.raises(Conflict, match="agent_version_immutable"):
        agents.save_draft(agent, {**SPEC, "role": "changed"}, origin=None, origin_ref=None)
    with pytest.raises(Conflict, match="agent_illegal_transition: cannot sandbox"):
        agents.sandbox(agent, validate_agent(agent.spec, policy()))
    events = agents.fork(agent)
    assert isinstance(events[0], AgentForked)
    assert (events[0].from_version, events[0].version) == (2, 3)
    forked = apply(agent, events)
    assert (forked.version, forked.state) == (3, "draft")
    # Production keeps running the governed version 2; the sandbox runs the new draft.
    assert forked.version_in("production") == 2 and forked.version_in("sandbox") == 3
    edited = apply(
        forked, agents.save_draft(forked, {**SPEC, "role": "v3"}, origin=None, origin_ref=None)
    )
    assert edited.governed is not None and edited.governed.spec_hash == spec_hash(SPEC)
    assert edited.spec_hash == spec_hash({**SPEC, "role": "v3"})
    # Through the sandbox and promoted again: version 4.
    again = apply(edited, agents.sandbox(edited, validate_agent(edited.spec, policy())))
    final = apply(again, agents.promote(again, validate_agent(again.spec, policy()), "u"))
    assert (final.version, final.governed.version if final.governed else None) == (4, 4)


def test_fork_only_from_governed() -> None:
    for agent in (drafted(), sandboxed()):
        with pytest.raises(Conflict, match="agent_illegal_transition: cannot fork"):
            agents.fork(agent)
    with pytest.raises(NotFound, match="agent_not_found"):
        agents.fork(Agent(agent_id="ghost"))


def test_disable_per_environment_and_everywhere() -> None:
    agent = governed()
    events = agents.disable(agent, ["production"], "incident 12", "user:admin")
    assert isinstance(events[0], AgentDisabled) and events[0].environments == ["production"]
    prod_off = apply(agent, events)
    assert prod_off.state_in("production") == "disabled"
    assert prod_off.state_in("sandbox") == "governed"
    assert prod_off.lifecycle == "governed"
    assert agents.disable(prod_off, ["production"], "again", "u") == []
    forked = apply(prod_off, agents.fork(prod_off))
    sandboxed_again = apply(forked, agents.sandbox(forked, validate_agent(forked.spec, policy())))
    with pytest.raises(Conflict, match=r"agent_disabled: .* in production"):
        agents.promote(sandboxed_again, validate_agent(SPEC, policy()), "u")
    off = apply(
        sandboxed_again, agents.disable(sandboxed_again, ["sandbox", "production"], "r", "u")
    )
    assert off.lifecycle == "disabled" and off.disabled == {"sandbox", "production"}
    with pytest.raises(Conflict, match="agent_disabled"):
        agents.save_draft(off, {"role": "x"}, origin=None, origin_ref=None)
    with pytest.raises(Conflict, match="agent_disabled"):
        agents.fork(off)
    with pytest.raises(InvalidInput, match="agent_disable_invalid"):
        agents.disable(agent, [], "r", "u")


def test_actions_follow_the_state() -> None:
    assert agents.actions_view(drafted())["lifecycle_actions"] == [
        "save_draft",
        "validate",
        "sandbox",
        "disable",
    ]
    assert "promote" in agents.actions_view(sandboxed())["lifecycle_actions"]
    view = agents.actions_view(governed())
    assert view["lifecycle_actions"] == ["validate", "fork", "disable"]
    assert view["tools"] == ["search"] and view["runnable_in"] == ["sandbox", "production"]
    assert agents.actions_view(drafted())["runnable_in"] == ["sandbox"]


# --- admission -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "environment", "denied"),
    [
        (drafted, "sandbox", None),
        (drafted, "production", "has no governed version (version 1 is draft)"),
        (sandboxed, "sandbox", None),
        (sandboxed, "production", "has no governed version (version 1 is sandbox)"),
        (governed, "sandbox", None),
        (governed, "production", None),
    ],
)
def test_admission_denies_an_ungoverned_agent_in_production_only(
    make: Any, environment: str, denied: str | None
) -> None:
    message = admission_denial(make().gate(), "reviewer", environment)
    if denied is None:
        assert message is None
    else:
        assert message is not None and denied in message


def test_admission_denies_a_disabled_agent_everywhere_and_ignores_unregistered_ids() -> None:
    agent = governed()
    off = apply(agent, agents.disable(agent, ["sandbox", "production"], "r", "u"))
    for environment in ("sandbox", "production"):
        message = admission_denial(off.gate(), "reviewer", environment)
        assert message == f"agent 'reviewer' is disabled in {environment}"
    assert admission_denial(None, "not-registered", "production") is None


def test_the_agent_state_deny_is_first_among_the_bundles_and_cannot_be_waived() -> None:
    raw = {"deny": [], "warn": [{"policy_id": "x", "severity": "low", "message": "m"}]}
    message = admission_denial(drafted().gate(), "reviewer", "production")
    assert message is not None
    decision = interpret(agents.with_deny(raw, agents.admission_reason(message)))
    assert decision.outcome == "deny"
    assert decision.violated is not None and decision.violated.policy_id == AGENT_STATE_POLICY
    assert agents.with_deny({"deny": "bad"}, {}) == {"deny": "bad"}
    with pytest.raises(InvalidInput, match="exception_policy_unwaivable"):
        grant(
            Exceptions(),
            exception_id="e",
            policy_id=AGENT_STATE_POLICY,
            agent_id="reviewer",
            run_id=None,
            reason="r",
            granted_by="u",
            expires_at=datetime(2026, 12, 1, tzinfo=UTC),
            now=AT,
        )


def test_policy_set_hash_is_stable_and_changes_with_each_part() -> None:
    base = policy_set_hash(DIGEST, {"max_tokens_per_run": 5}, ["b", "a"])
    assert base == policy_set_hash(DIGEST, {"max_tokens_per_run": 5}, ["a", "b", "a"])
    assert base != policy_set_hash("sha256:" + "b" * 64, {"max_tokens_per_run": 5}, ["a", "b"])
    assert base != policy_set_hash(DIGEST, {"max_tokens_per_run": 6}, ["a", "b"])
    assert base != policy_set_hash(DIGEST, {"max_tokens_per_run": 5}, ["a"])
    assert policy_set_hash(DIGEST, None, ()) == policy_set_hash(DIGEST, {}, [])
