"""Workflow definitions and the agent catalogue: documents, validation, versions and diffs.

A workflow definition is a versioned document (YAML or JSON, parsed into
:class:`WorkflowDocument`) of steps with dependencies. Each step names its agent and inputs, its
risk tier, its token and cost estimate, its timeout, retries and failure policy. Dependencies
make sequences, fan-outs (several steps depending on one) and fan-ins (one step depending on
several).

A document is validated when it is saved, and every problem is reported at once, by name:

* a dependency cycle, as the order it would run in: ``a → b → c → a``;
* a dependency on a step that does not exist;
* a step whose agent is not in the tenant's agent catalogue;
* two steps with one id.

Definitions are events: ``workflow.definition_created`` for version 1 and
``workflow.definition_revised`` for each later version, kept on one stream per tenant (the
tenant's catalogue, which listing reads whole). Saving a document equal to the newest version
changes nothing, so a client may save again after a timeout without minting a new version.

Pure functions only: ``decide_definition(state, command)`` and ``fold_catalogue``.
"""

from __future__ import annotations

import graphlib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AgentRegistered,
    WorkflowDefinitionCreated,
    WorkflowDefinitionRevised,
)
from libs.contracts.limits import MAX_RUN_ID, WORKFLOW_NAME_PATTERN
from libs.errors import Conflict, InvalidInput, NotFound

WORKFLOW_CATEGORY = "workflow_definitions"
AGENT_CATEGORY = "agents"
CATALOGUE = "catalogue"
"""The entity id of a tenant's one catalogue stream (``<tenant>/<category>/catalogue``)."""

NAME_PATTERN = WORKFLOW_NAME_PATTERN
EXECUTION_ID_LENGTH = 36
"""Execution ids are UUIDv7s."""
MAX_ATTEMPT_DIGITS = 2
"""At most 11 attempts (``retries`` is at most 10)."""
MAX_STEP_ID = MAX_RUN_ID - EXECUTION_ID_LENGTH - len("::") - MAX_ATTEMPT_DIGITS
"""An attempt's run id is ``<execution_id>:<step_id>:<attempt>`` and must be a valid run id."""
STEP_ID_PATTERN = rf"^[a-z0-9][a-z0-9_-]{{0,{MAX_STEP_ID - 1}}}$"

MAX_STEPS = 500
MAX_DOCUMENT_BYTES = 256 * 1024

RiskTier = Literal["read_only", "write", "irreversible"]
FailurePolicy = Literal["fail", "continue"]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
StepId = Annotated[str, Field(pattern=STEP_ID_PATTERN)]


# --- the document --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepEstimate(_Strict):
    """What a step is expected to use; budgets reserve it before the step is dispatched."""

    input_tokens: int = Field(default=0, ge=0, le=100_000_000)
    output_tokens: int = Field(default=0, ge=0, le=100_000_000)
    cost_usd: Decimal = Field(default=Decimal(0), ge=0, le=1_000_000, decimal_places=10)


class StepSpec(_Strict):
    """One step of a workflow."""

    id: StepId
    agent: Name
    inputs: dict[str, Any] = Field(default_factory=dict)
    depends_on: tuple[StepId, ...] = ()
    risk_tier: RiskTier = "read_only"
    estimate: StepEstimate = Field(default_factory=StepEstimate)
    timeout_s: float = Field(default=300, gt=0, le=86_400)
    retries: int = Field(default=0, ge=0, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0, le=3_600)
    on_failure: FailurePolicy = "fail"

    @field_validator("depends_on")
    @classmethod
    def _no_repeats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("depends_on names a step twice")
        return value


class WorkflowDocument(_Strict):
    """A workflow definition document, as saved."""

    name: Name
    description: str = Field(default="", max_length=2000)
    steps: tuple[StepSpec, ...] = Field(min_length=1, max_length=MAX_STEPS)

    def step(self, step_id: str) -> StepSpec:
        """The step named ``step_id``."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise NotFound(f"workflow {self.name!r} has no step {step_id!r}")

    def content(self) -> dict[str, Any]:
        """The document as plain JSON values (the form events carry and hashes cover)."""
        return self.model_dump(mode="json")


def parse_document(text: str | bytes, media_type: str = "application/json") -> WorkflowDocument:
    """Parse a YAML or JSON document; a syntax or shape error names where it is."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise InvalidInput(f"workflow document is over {MAX_DOCUMENT_BYTES} bytes")
    data: Any
    if "yaml" in media_type:
        import yaml  # only YAML uploads need it

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"workflow document is not valid YAML: {exc}") from None
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"workflow document is not valid JSON: {exc}") from None
    return document_from(data)


def document_from(data: Any) -> WorkflowDocument:
    """Validate plain data as a :class:`WorkflowDocument`, naming each bad field."""
    try:
        return WorkflowDocument.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidInput(f"invalid workflow document: {problems}") from None


def document_hash(document: WorkflowDocument) -> str:
    """SHA-256 (hex) of the document's RFC 8785 canonical JSON: equal documents, equal hashes."""
    return hashlib.sha256(canonical_json(document.content())).hexdigest()


def validation_problems(document: WorkflowDocument, known_agents: Iterable[str]) -> list[str]:
    """Every problem of ``document`` against the tenant's ``known_agents``, each by name."""
    problems: list[str] = []
    ids = [s.id for s in document.steps]
    seen: set[str] = set()
    for step_id in ids:
        if step_id in seen:
            problems.append(f"step {step_id!r} is defined twice")
        seen.add(step_id)
    for s in document.steps:
        for dep in s.depends_on:
            if dep not in seen:
                problems.append(f"step {s.id!r} depends on {dep!r}, which is not a step")
            elif dep == s.id:
                problems.append(f"step {s.id!r} depends on itself")
    agents = set(known_agents)
    for agent in sorted({s.agent for s in document.steps} - agents):
        users = ", ".join(repr(s.id) for s in document.steps if s.agent == agent)
        problems.append(f"agent {agent!r} (step {users}) is not registered")
    cycle = find_cycle(document)
    if cycle:
        problems.append(f"steps form a cycle: {' → '.join(cycle)}")
    return problems


def find_cycle(document: WorkflowDocument) -> list[str] | None:
    """A dependency cycle in run order (``[a, b, c, a]``: a runs before b ...), or None."""
    graph = {s.id: {d for d in s.depends_on if d != s.id} for s in document.steps}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return [str(n) for n in exc.args[1]]
    return None


def validate(document: WorkflowDocument, known_agents: Iterable[str]) -> None:
    """Raise :class:`~libs.errors.InvalidInput` listing every problem of ``document``."""
    problems = validation_problems(document, known_agents)
    if problems:
        raise InvalidInput(f"workflow {document.name!r} is invalid: " + "; ".join(problems))


def execution_order(document: WorkflowDocument) -> list[tuple[str, ...]]:
    """The steps in waves: each wave's steps depend only on earlier waves (parallel within)."""
    sorter = graphlib.TopologicalSorter({s.id: set(s.depends_on) for s in document.steps})
    sorter.prepare()
    waves: list[tuple[str, ...]] = []
    while sorter.is_active():
        ready = tuple(sorted(sorter.get_ready()))
        waves.append(ready)
        sorter.done(*ready)
    return waves


# --- the catalogue aggregate ---------------------------------------------------------------------


@dataclass(frozen=True)
class DefinitionVersion:
    """One saved version of a workflow."""

    version: int
    document: WorkflowDocument
    document_hash: str


@dataclass(frozen=True)
class Catalogue:
    """A tenant's agents and workflow definitions, every version kept."""

    tenant_id: str
    agents: Mapping[str, str] = field(default_factory=dict)
    """agent id → description."""
    workflows: Mapping[str, tuple[DefinitionVersion, ...]] = field(default_factory=dict)

    def versions(self, workflow_id: str) -> tuple[DefinitionVersion, ...]:
        """Every version of ``workflow_id``, oldest first; NotFound when there is none."""
        found = self.workflows.get(workflow_id)
        if not found:
            raise NotFound(f"workflow {workflow_id!r} not found")
        return found

    def version(self, workflow_id: str, version: int | None = None) -> DefinitionVersion:
        """A version of ``workflow_id`` (the newest when ``version`` is None)."""
        versions = self.versions(workflow_id)
        if version is None:
            return versions[-1]
        if not 1 <= version <= len(versions):
            raise NotFound(
                f"workflow {workflow_id!r} has no version {version} (it has 1..{len(versions)})"
            )
        return versions[version - 1]


def empty_catalogue(tenant_id: str, _entity: str = CATALOGUE) -> Catalogue:
    """The catalogue of a tenant that has registered nothing."""
    return Catalogue(tenant_id=tenant_id)


def evolve_catalogue(state: Catalogue, event: DomainEvent) -> Catalogue:
    """Apply one event."""
    if isinstance(event, AgentRegistered):
        return replace(state, agents={**state.agents, event.agent_id: event.description})
    if isinstance(event, WorkflowDefinitionCreated | WorkflowDefinitionRevised):
        doc = WorkflowDocument.model_validate(event.document)
        entry = DefinitionVersion(event.version, doc, event.document_hash)
        versions = state.workflows.get(event.workflow_id, ())
        return replace(state, workflows={**state.workflows, event.workflow_id: (*versions, entry)})
    return state


def fold_catalogue(state: Catalogue, events: Iterable[DomainEvent]) -> Catalogue:
    """Apply events in order."""
    for event in events:
        state = evolve_catalogue(state, event)
    return state


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveDefinition:
    """Save a workflow document as its next version.

    ``base_version``, when given, is the version the author edited; saving fails with a conflict
    if someone saved a newer one meanwhile, so two authors never overwrite each other unseen.
    """

    document: WorkflowDocument
    base_version: int | None = None


@dataclass(frozen=True)
class RegisterAgent:
    """Add an agent to the tenant's catalogue (registering it again changes nothing)."""

    agent_id: str
    description: str = ""


def decide_definition(state: Catalogue, command: SaveDefinition) -> list[DomainEvent]:
    """The event saving ``command.document`` causes (none when it equals the newest version)."""
    doc = command.document
    validate(doc, state.agents)
    digest = document_hash(doc)
    versions = state.workflows.get(doc.name, ())
    if not versions:
        if command.base_version not in (None, 0):
            raise Conflict(f"workflow {doc.name!r} does not exist yet; omit base_version")
        return [
            WorkflowDefinitionCreated(
                workflow_id=doc.name, version=1, document=doc.content(), document_hash=digest
            )
        ]
    newest = versions[-1]
    if newest.document_hash == digest:
        return []
    if command.base_version is not None and command.base_version != newest.version:
        raise Conflict(
            f"workflow {doc.name!r} is at version {newest.version}, "
            f"not {command.base_version}: load it again and reapply the change"
        )
    return [
        WorkflowDefinitionRevised(
            workflow_id=doc.name,
            version=newest.version + 1,
            document=doc.content(),
            document_hash=digest,
            previous_hash=newest.document_hash,
        )
    ]


def decide_agent(state: Catalogue, command: RegisterAgent) -> list[DomainEvent]:
    """The event registering an agent (none when it is already registered as described)."""
    if state.agents.get(command.agent_id) == command.description:
        return []
    return [AgentRegistered(agent_id=command.agent_id, description=command.description)]


# --- diff ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One changed value: ``path`` is dotted (``steps.fetch.retries``)."""

    path: str
    before: Any
    after: Any


def diff_documents(before: WorkflowDocument, after: WorkflowDocument) -> dict[str, Any]:
    """Steps added and removed, and every changed field, between two documents."""
    b_steps = {s.id: s.model_dump(mode="json") for s in before.steps}
    a_steps = {s.id: s.model_dump(mode="json") for s in after.steps}
    changes: list[Change] = []
    for key in ("name", "description"):
        old, new = getattr(before, key), getattr(after, key)
        if old != new:
            changes.append(Change(key, old, new))
    for step_id in sorted(b_steps.keys() & a_steps.keys()):
        changes.extend(_changes(f"steps.{step_id}", b_steps[step_id], a_steps[step_id]))
    return {
        "steps_added": sorted(a_steps.keys() - b_steps.keys()),
        "steps_removed": sorted(b_steps.keys() - a_steps.keys()),
        "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in changes],
    }


def _changes(path: str, before: Any, after: Any) -> list[Change]:
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[Change] = []
        for key in sorted(before.keys() | after.keys(), key=str):
            out.extend(_changes(f"{path}.{key}", before.get(key), after.get(key)))
        return out
    return [] if before == after else [Change(path, before, after)]


def summary(name: str, versions: Sequence[DefinitionVersion]) -> dict[str, Any]:
    """A workflow's line in a listing."""
    newest = versions[-1]
    return {
        "workflow_id": name,
        "version": newest.version,
        "document_hash": newest.document_hash,
        "description": newest.document.description,
        "steps": len(newest.document.steps),
    }
