"""The agent registry on two policy-admission replicas against the real event store and NATS:
the lifecycle recorded on the agent's stream with the policy set of every validation and
promotion, and admission on either replica denying a registered agent's runs where it may not
run (a draft in production, a disabled agent anywhere) from memory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from libs.contracts import stream_id_for
from libs.contracts.events import (
    AdmissionDecided,
    AgentDisabled,
    AgentDraftSaved,
    AgentForked,
    AgentPromoted,
    AgentSandboxed,
    AgentValidated,
    PolicyViolationDetected,
    RunStarted,
)
from libs.contracts.policy import policy_set_hash
from libs.contracts.registry import decode
from libs.errors import Conflict, InvalidInput, NotFound
from services.policy_admission.agents import AGENT_STATE_POLICY
from tests.conftest import System, wait_until
from tests.integration.test_admission import Admission, _append, running_admission
from tests.integration.test_policy_bundles import DEFAULT_DIGEST, Replicas, _on, _refused

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]

SPEC: dict[str, Any] = {
    "identity": {"name": "Triage", "owner": "team-triage"},
    "role": "Sorts incoming tickets",
    "model": {"model": "gpt-4o"},
    "tools": [{"name": "search"}],
}


@pytest.fixture
async def replicas(system: System) -> AsyncIterator[Replicas]:
    async with running_admission(system) as a, running_admission(system) as b:
        yield Replicas(a, b)


async def _stream(replicas: Replicas, tenant: str, agent_id: str) -> list[Any]:
    stream = stream_id_for(tenant, "policy", f"agent-{agent_id}")
    return [decode(e) for e in await replicas.a.store.read_stream(stream)]


async def _admit(
    admission: Admission, tenant: str, agent_id: str, environment: str, unique: Unique
) -> dict[str, Any]:
    """A fresh run of ``agent_id`` and its first step's decision (on that replica)."""
    run_id = unique("run-") + uuid.uuid4().hex[:8]  # a fresh run each time
    await _append(admission.store, tenant, run_id, RunStarted(run_id=run_id, agent_id=agent_id))
    return await _on(admission).admit(
        tenant,
        {
            "run_id": run_id,
            "step_index": 1,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10},
            "environment": environment,
        },
        {},
    )


def _known(admission: Admission, tenant: str, agent_id: str, state: str) -> bool:
    tenants = admission.service.tenants
    assert tenants is not None
    gate = tenants.agent_gate(tenant, agent_id)
    return gate is not None and gate.state == state


async def _everywhere(replicas: Replicas, tenant: str, agent_id: str, state: str) -> None:
    for replica in (replicas.a, replicas.b):
        await wait_until(
            lambda r=replica: _known(r, tenant, agent_id, state),  # type: ignore[misc]
            what=f"the replica knows {agent_id} is {state}",
        )


async def _settings(replicas: Replicas, tenant: str, models: list[str]) -> None:
    """Set the tenant's model allowlist and wait until both replicas apply it."""
    await replicas.call("put_settings", tenant, settings={"model_allowlist": models})

    def applied(admission: Admission) -> bool:
        tenants = admission.service.tenants
        assert tenants is not None
        return (tenants.settings_for(tenant) or {}).get("model_allowlist") == models

    for replica in (replicas.a, replicas.b):
        await wait_until(lambda r=replica: applied(r), what="the settings applied")  # type: ignore[misc]


async def test_the_lifecycle_is_recorded_with_the_policy_set_and_admission_follows_it(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    agent_id = unique("triage-")
    call = replicas.call
    expected_set = policy_set_hash(DEFAULT_DIGEST, None, ())

    # Unregistered: admitted by the bundle alone, as before the registry.
    before = await _admit(replicas.b, tenant, agent_id, "production", unique)
    assert before["outcome"] == "allow" and "agent" not in before["context"]
    assert before["context"]["policy_set_hash"] == expected_set

    created = await call(
        "agent_save_draft", tenant, agent_id=agent_id, spec=SPEC, origin="template", actor="u:1"
    )
    assert (created["version"], created["state"], created["created"]) == (1, "draft", True)
    assert created["origin"] == {"type": "template", "ref": None}
    again = await call("agent_save_draft", tenant, agent_id=agent_id, spec=dict(SPEC))
    assert again["changed"] is False and again["created"] is False  # idempotent autosave
    await _everywhere(replicas, tenant, agent_id, "draft")

    # A draft: denied in production (by name, recorded as a violation), admitted in sandbox.
    denied = await _admit(replicas.b, tenant, agent_id, "production", unique)
    assert denied["outcome"] == "deny"
    assert denied["reasons"][0]["policy_id"] == AGENT_STATE_POLICY
    assert "has no governed version" in denied["reasons"][0]["message"]
    assert denied["context"]["agent"]["state"] == "draft"
    decisions = [
        decode(e)
        for e in await replicas.a.store.read_stream(
            stream_id_for(tenant, "decisions", denied["context"]["run_id"])
        )
    ]
    assert [type(e) for e in decisions] == [AdmissionDecided, PolicyViolationDetected]
    assert decisions[0].context["policy_set_hash"] == expected_set  # type: ignore[attr-defined]
    sandboxed_run = await _admit(replicas.a, tenant, agent_id, "sandbox", unique)
    assert sandboxed_run["outcome"] == "allow"

    # Validation against a tenant allowlist that refuses the model: named, recorded, and the
    # sandbox refuses the agent.
    await _settings(replicas, tenant, ["claude-sonnet-4"])
    checked = await call("agent_validate", tenant, agent_id=agent_id, environment="sandbox")
    assert checked["passed"] is False
    assert [(p["code"], p["path"]) for p in checked["problems"]] == [
        ("model_not_allowed", "model.model")
    ]
    assert checked["policy_digest"] == DEFAULT_DIGEST
    assert checked["policy_set_hash"] == policy_set_hash(
        DEFAULT_DIGEST, {"model_allowlist": ["claude-sonnet-4"]}, ()
    )
    await _refused(call("agent_sandbox", tenant, agent_id=agent_id), InvalidInput, "agent_invalid")
    await _settings(replicas, tenant, ["gpt-4o"])

    await _refused(
        call("agent_promote", tenant, agent_id=agent_id), Conflict, "agent_illegal_transition"
    )
    sandboxed = await call("agent_sandbox", tenant, agent_id=agent_id)
    assert sandboxed["state"] == "sandbox" and sandboxed["sandboxed"]["policy_digest"]
    promoted = await call("agent_promote", tenant, agent_id=agent_id, actor="user:admin")
    assert (promoted["version"], promoted["state"]) == (2, "governed")
    assert promoted["governed"]["promoted_by"] == "user:admin"
    assert promoted["governed"]["policy_set_hash"] == policy_set_hash(
        DEFAULT_DIGEST, {"model_allowlist": ["gpt-4o"]}, ()
    )
    await _everywhere(replicas, tenant, agent_id, "governed")
    allowed = await _admit(replicas.b, tenant, agent_id, "production", unique)
    assert allowed["outcome"] == "allow"
    assert allowed["context"]["agent"] == {
        "registered": True,
        "version": 2,
        "state": "governed",
        "governed_version": 2,
    }

    # Governed is immutable; a fork opens version 3 while production keeps running version 2.
    await _refused(
        call("agent_save_draft", tenant, agent_id=agent_id, spec={**SPEC, "role": "x"}),
        Conflict,
        "agent_version_immutable",
    )
    forked = await call("agent_fork", tenant, agent_id=agent_id)
    assert (forked["version"], forked["state"]) == (3, "draft")
    assert forked["environments"]["production"] == {"state": "governed", "version": 2}
    await _everywhere(replicas, tenant, agent_id, "draft")
    assert (await _admit(replicas.b, tenant, agent_id, "production", unique))["outcome"] == "allow"

    # Disabled everywhere: denied in both environments, on both replicas.
    off = await call(
        "agent_disable", tenant, agent_id=agent_id, reason="incident 7", actor="user:admin"
    )
    assert off["state"] == "disabled" and off["disabled"] == ["production", "sandbox"]
    await _everywhere(replicas, tenant, agent_id, "disabled")
    for replica, environment in ((replicas.a, "sandbox"), (replicas.b, "production")):
        result = await _admit(replica, tenant, agent_id, environment, unique)
        assert result["outcome"] == "deny"
        assert result["reasons"][0]["message"] == f"agent {agent_id!r} is disabled in {environment}"
    await _refused(call("agent_fork", tenant, agent_id=agent_id), Conflict, "agent_disabled")

    events = await _stream(replicas, tenant, agent_id)
    assert [type(e) for e in events] == [
        AgentDraftSaved,
        AgentValidated,  # the failing validation
        AgentValidated,  # the sandbox's
        AgentSandboxed,
        AgentValidated,  # production's, at promotion
        AgentPromoted,
        AgentForked,
        AgentDisabled,
    ]
    listing = await call("agent_list", tenant, state="disabled")
    assert [a["agent_id"] for a in listing["agents"]] == [agent_id]
    assert listing["agents"][0]["governed_version"] == 2


async def test_a_replica_started_later_loads_the_agents_and_unknown_agents_are_404(
    system: System, replicas: Replicas, tenant: str, unique: Unique
) -> None:
    agent_id = unique("loaded-")
    await replicas.call("agent_save_draft", tenant, agent_id=agent_id, spec={"role": "partial"})
    async with running_admission(system) as late:
        assert _known(late, tenant, agent_id, "draft")
        result = await _admit(late, tenant, agent_id, "production", unique)
        assert result["outcome"] == "deny"
    await _refused(
        replicas.call("agent_get", tenant, agent_id=unique("ghost-")), NotFound, "agent_not_found"
    )
    partial = await replicas.call("agent_validate", tenant, agent_id=agent_id)
    assert partial["passed"] is False
    assert {p["path"] for p in partial["problems"]} >= {"identity", "model"}
