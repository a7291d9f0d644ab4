"""An agent's stored versions, folded from its stream: the last draft save of a version is its
spec, a fork and a promotion open the next version from the current spec, the governed and
current versions are marked, and disabling changes no version."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.contracts.agents import spec_hash
from libs.contracts.envelope import DomainEvent
from libs.errors import NotFound
from services.policy_admission import agents
from services.policy_admission.agents import AgentHistory, validate_agent
from tests.unit.test_agent_registry import SPEC, policy

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class Clock:
    """One minute further at each event, so each version's ``saved_at`` names its event."""

    def __init__(self) -> None:
        self.now = T0

    def tick(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def apply(history: AgentHistory, events: Sequence[DomainEvent], clock: Clock) -> AgentHistory:
    for event in events:
        history = agents.evolve_history(history, event, clock.tick())
    return history


def save(history: AgentHistory, spec: dict[str, Any], clock: Clock) -> AgentHistory:
    return apply(
        history, agents.save_draft(history.agent, spec, origin=None, origin_ref=None), clock
    )


def sandbox_and_promote(history: AgentHistory, clock: Clock) -> AgentHistory:
    agent = history.agent
    history = apply(history, agents.sandbox(agent, validate_agent(agent.spec, policy())), clock)
    verdict = validate_agent(history.agent.spec, policy("production"))
    return apply(history, agents.promote(history.agent, verdict, "user:admin"), clock)


def fresh() -> AgentHistory:
    return AgentHistory(agent=agents.Agent(agent_id="reviewer"))


def marks(history: AgentHistory) -> list[tuple[int, str, int | None, bool, bool]]:
    return [
        (v["version"], v["made_by"], v["from_version"], v["current"], v["governed"])
        for v in agents.versions_view(history)["versions"]
    ]


def test_a_version_saved_twice_holds_its_last_save() -> None:
    clock = Clock()
    first = {**SPEC, "role": "Reviews pull requests"}
    second = {**SPEC, "role": "Reviews and merges pull requests"}
    history = save(fresh(), first, clock)
    history = save(history, second, clock)
    saved_at = clock.now
    history = save(history, second, clock)  # autosave of the same content records nothing

    assert list(history.versions) == [1]
    one = agents.version_view(history, 1)
    assert one["spec"] == second and one["spec_hash"] == spec_hash(second)
    assert (one["made_by"], one["from_version"]) == ("draft", None)
    assert one["saved_at"] == saved_at.isoformat()
    assert marks(history) == [(1, "draft", None, True, False)]


def test_promote_and_fork_open_versions_from_the_current_spec_and_drafts_edit_the_newest() -> None:
    clock = Clock()
    history = save(fresh(), {**SPEC, "role": "v1 draft"}, clock)
    history = save(history, SPEC, clock)
    history = sandbox_and_promote(history, clock)
    promoted_at = clock.now
    history = apply(history, agents.fork(history.agent), clock)
    forked_at = clock.now

    # Promote: version 2 is version 1's spec, governed; fork: version 3 starts as that spec.
    two, three = agents.version_view(history, 2), agents.version_view(history, 3)
    assert two["spec"] == three["spec"] == SPEC
    assert two["spec_hash"] == three["spec_hash"] == spec_hash(SPEC)
    assert (two["made_by"], two["saved_at"]) == ("promote", promoted_at.isoformat())
    assert (three["made_by"], three["saved_at"]) == ("fork", forked_at.isoformat())
    assert marks(history) == [
        (3, "fork", 2, True, False),
        (2, "promote", 1, False, True),
        (1, "draft", None, False, False),
    ]

    # Editing the fork changes version 3 only; it still says where it came from.
    edited = {**SPEC, "role": "Reviews and answers"}
    history = save(history, edited, clock)
    three = agents.version_view(history, 3)
    assert three["spec"] == edited and three["spec_hash"] == spec_hash(edited)
    assert (three["made_by"], three["from_version"]) == ("draft", 2)
    assert agents.version_view(history, 2)["spec"] == SPEC
    assert agents.version_view(history, 1)["spec"] == SPEC

    # Promoting the fork: version 4 is governed now, version 2 no longer.
    history = sandbox_and_promote(history, clock)
    assert marks(history)[:3] == [
        (4, "promote", 3, True, True),
        (3, "draft", 2, False, False),
        (2, "promote", 1, False, False),
    ]
    assert agents.version_view(history, 4)["spec"] == edited
    listing = agents.versions_view(history)
    assert (listing["version"], listing["state"], listing["governed_version"]) == (
        4,
        "governed",
        4,
    )


def test_disabling_changes_no_version() -> None:
    clock = Clock()
    history = sandbox_and_promote(save(fresh(), SPEC, clock), clock)
    before = agents.versions_view(history)
    history = apply(
        history, agents.disable(history.agent, ["sandbox", "production"], "x", "user:a"), clock
    )
    after = agents.versions_view(history)
    assert after["state"] == "disabled" and before["state"] == "governed"
    assert after["versions"] == before["versions"]
    assert agents.version_view(history, 2)["spec"] == SPEC


def test_an_unknown_agent_or_version_is_named() -> None:
    with pytest.raises(NotFound, match=r"^agent_not_found: "):
        agents.versions_view(fresh())
    with pytest.raises(NotFound, match=r"^agent_not_found: "):
        agents.version_view(fresh(), 1)
    history = save(fresh(), SPEC, Clock())
    with pytest.raises(
        NotFound,
        match=r"^agent_version_not_found: agent 'reviewer' has no version 2; its "
        r"versions are 1 to 1$",
    ):
        agents.version_view(history, 2)
