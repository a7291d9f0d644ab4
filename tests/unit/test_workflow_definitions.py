"""Workflow definitions: validation names every problem, versions are events, diffs name fields."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.contracts.envelope import stream_id_for
from libs.contracts.registry import decode
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.rpc import RequestMeta
from services.workflow_engine.definitions import (
    AGENT_CATEGORY,
    CATALOGUE,
    WORKFLOW_CATEGORY,
    Catalogue,
    SaveDefinition,
    decide_definition,
    document_from,
    execution_order,
    parse_document,
)
from services.workflow_engine.handlers import DefinitionHandlers

pytestmark = pytest.mark.unit

T = "acme"
META = RequestMeta.from_headers({"Mc-Correlation-Id": "c-1", "Mc-Actor": "user:alice"})


def doc(*steps: dict[str, Any], name: str = "triage") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


def step(sid: str, *deps: str, agent: str = "worker", **extra: Any) -> dict[str, Any]:
    return {"id": sid, "agent": agent, "depends_on": list(deps), **extra}


def problems_of(data: dict[str, Any], agents: tuple[str, ...] = ("worker",)) -> str:
    state = Catalogue(tenant_id=T, agents=dict.fromkeys(agents, ""))
    with pytest.raises(InvalidInput) as info:
        decide_definition(state, SaveDefinition(document_from(data)))
    return str(info.value)


def test_a_cycle_is_rejected_naming_it_in_run_order() -> None:
    message = problems_of(doc(step("a", "c"), step("b", "a"), step("c", "b"), step("d", "a")))
    assert "cycle: a → b → c → a" in message


def test_a_missing_step_is_named() -> None:
    message = problems_of(doc(step("a"), step("b", "a", "ghost")))
    assert "step 'b' depends on 'ghost', which is not a step" in message


def test_an_unknown_agent_is_named_with_its_steps() -> None:
    message = problems_of(doc(step("a"), step("b", "a", agent="stranger")))
    assert "agent 'stranger' (step 'b') is not registered" in message


def test_every_problem_is_reported_at_once() -> None:
    message = problems_of(doc(step("a", "a"), step("a"), step("b", "nope", agent="x")))
    for expected in ("defined twice", "depends on itself", "'nope'", "agent 'x'"):
        assert expected in message


def test_a_bad_field_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"steps\.0\.risk_tier"):
        document_from(doc(step("a", risk_tier="dangerous")))
    with pytest.raises(InvalidInput, match="steps"):
        document_from({"name": "empty", "steps": []})


def test_yaml_and_json_parse_to_the_same_document() -> None:
    yaml_text = """
name: triage
steps:
  - id: fetch
    agent: worker
  - id: act
    agent: worker
    depends_on: [fetch]
    risk_tier: irreversible
    estimate: {input_tokens: 100, output_tokens: 50, cost_usd: "0.25"}
"""
    from_yaml = parse_document(yaml_text, "application/yaml")
    json_text = (
        '{"name":"triage","steps":[{"id":"fetch","agent":"worker"},{"id":"act","agent":"worker",'
        '"depends_on":["fetch"],"risk_tier":"irreversible",'
        '"estimate":{"input_tokens":100,"output_tokens":50,"cost_usd":"0.25"}}]}'
    )
    assert from_yaml == parse_document(json_text)
    with pytest.raises(InvalidInput, match="not valid YAML"):
        parse_document("steps: [", "application/yaml")


def test_fan_out_and_fan_in_run_in_waves() -> None:
    d = document_from(doc(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")))
    assert execution_order(d) == [("a",), ("b", "c"), ("d",)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_versions_are_events_and_equal_saves_change_nothing() -> None:
    store = InMemoryEventStore()
    h = DefinitionHandlers(store)

    async def scenario() -> None:
        await h.register_agent(T, "worker", "does the work", META)
        v1 = await h.save(T, document_from(doc(step("a"))), None, META)
        assert (v1["version"], v1["created"]) == (1, True)
        again = await h.save(T, document_from(doc(step("a"))), None, META)
        assert (again["version"], again["created"]) == (1, False)
        v2 = await h.save(T, document_from(doc(step("a"), step("b", "a", retries=2))), 1, META)
        assert v2["version"] == 2
        with pytest.raises(Conflict, match="at version 2, not 1"):
            await h.save(T, document_from(doc(step("a", retries=1))), 1, META)

        events = await store.read_stream(stream_id_for(T, WORKFLOW_CATEGORY, CATALOGUE))
        assert [e.event_type for e in events] == [
            "workflow.definition_created",
            "workflow.definition_revised",
        ]
        assert all(e.actor == "user:alice" for e in events)
        revised = decode(events[1])
        assert revised.previous_hash == v1["document_hash"]  # type: ignore[attr-defined]
        agents = await store.read_stream(stream_id_for(T, AGENT_CATEGORY, CATALOGUE))
        assert [e.event_type for e in agents] == ["agent.registered"]

        listed = await h.list_workflows(T)
        assert [(w["workflow_id"], w["version"], w["steps"]) for w in listed] == [("triage", 2, 2)]
        got = await h.get(T, "triage", 1)
        assert got["versions"] == [1, 2] and len(got["document"]["steps"]) == 1
        diff = await h.diff(T, "triage", 1, None)
        assert diff["steps_added"] == ["b"] and diff["steps_removed"] == []
        with pytest.raises(NotFound, match="no version 3"):
            await h.get(T, "triage", 3)
        with pytest.raises(NotFound):
            await h.get("other", "triage", None)

    run(scenario())


def test_a_changed_field_is_named_by_its_path() -> None:
    store = InMemoryEventStore()
    h = DefinitionHandlers(store)

    async def scenario() -> dict[str, Any]:
        await h.register_agent(T, "worker", "", META)
        await h.save(T, document_from(doc(step("a", timeout_s=30))), None, META)
        await h.save(T, document_from(doc(step("a", timeout_s=60, inputs={"q": 1}))), None, META)
        return await h.diff(T, "triage", 1, 2)

    diff = run(scenario())
    assert {"path": "steps.a.timeout_s", "before": 30.0, "after": 60.0} in diff["changes"]
    assert {"path": "steps.a.inputs.q", "before": None, "after": 1} in diff["changes"]


def test_the_longest_step_id_makes_a_valid_attempt_run_id() -> None:
    import re

    from libs.contracts.limits import RUN_ID_PATTERN
    from services.workflow_engine.definitions import MAX_STEP_ID
    from services.workflow_engine.executions import attempt_run_id

    longest = "s" * MAX_STEP_ID
    document_from(doc({"id": longest, "agent": "worker"}))
    run_id = attempt_run_id("01234567-89ab-7def-8123-456789abcdef", longest, 11)
    assert re.match(RUN_ID_PATTERN, run_id)
    with pytest.raises(InvalidInput, match=r"steps\.0\.id"):
        document_from(doc({"id": longest + "s", "agent": "worker"}))
