"""The canonical agent spec: what an agent of the registry is, checked the same way everywhere.

An agent is saved as a **draft** whose spec may be partial (a wizard autosaves as the author
types); :class:`AgentSpec` is the complete, validated form that ``validate``, ``sandbox`` and
``promote`` require. See ``docs/agents.md``.

Sections: identity, role, model and runtime, tools, memory, triggers, limits and policies. The
agent's **origin** (how it came to be: template, scratch, clone, workflow, conversation, event or
import) is recorded once, when its first draft is saved.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.canonical import canonical_json
from libs.contracts.limits import MAX_REASON, MAX_TOKENS
from libs.contracts.policy import MAX_COST_USD, AllowedName, UnicodeText

REGISTRY_AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""Ids of registered agents: safe in URLs, stream ids and subjects (a run may name any agent id;
only ids of this shape can be registered)."""

Origin = Literal["template", "scratch", "clone", "workflow", "conversation", "event", "import"]
ORIGINS: tuple[Origin, ...] = (
    "template",
    "scratch",
    "clone",
    "workflow",
    "conversation",
    "event",
    "import",
)
LifecycleState = Literal["draft", "sandbox", "governed", "disabled"]
VersionMadeBy = Literal["draft", "fork", "promote"]
"""What set the spec a stored version holds: a draft save, the fork that opened the version, or
the promotion that made it."""
MAX_AGENT_VERSION = 2**31 - 1
"""The largest version number a request may name (a bound JSON numbers carry everywhere)."""
TriggerType = Literal["manual", "workflow", "event", "schedule", "none"]
MemoryKind = Literal["none", "session", "persistent"]

MAX_TOOLS = 100
MAX_TRIGGERS = 20
MAX_TAGS = 50
MAX_POLICIES = 100
MAX_SPEC_BYTES = 64 * 1024
"""The largest spec (canonical JSON) a draft may hold."""
MAX_STEPS = 1_000_000
MAX_RETENTION_DAYS = 3650


Name = AllowedName
"""A name: 1-200 characters, no control characters."""
Text = Annotated[str, StringConstraints(max_length=MAX_REASON, pattern=r"^[^\x00]*$"), UnicodeText]
"""Free text: no NUL (PostgreSQL's jsonb cannot hold one)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Identity(_Section):
    """Who the agent is."""

    name: Name
    description: Text = ""
    owner: Name | None = None
    tags: list[Name] = Field(default_factory=list, max_length=MAX_TAGS)


class ModelRuntime(_Section):
    """The model it calls and the runtime it runs in."""

    model: Name
    provider: Name | None = None
    runtime: Name = "default"
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)


class Tool(_Section):
    """A tool the agent may call (a workflow step may name it as one of the agent's actions)."""

    name: Name
    description: Text = ""


class Memory(_Section):
    """What the agent remembers between runs."""

    kind: MemoryKind = "none"
    retention_days: int | None = Field(default=None, ge=1, le=MAX_RETENTION_DAYS)


class Trigger(_Section):
    """What starts a run: by hand, a workflow step, an event, a schedule (``ref`` names the
    workflow, event type or cron expression)."""

    type: TriggerType
    ref: Name | None = None


class Limits(_Section):
    """The agent's own limits per run (at most the tenant's)."""

    max_tokens_per_run: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    max_cost_usd_per_run: Decimal | None = Field(
        default=None, ge=0, le=MAX_COST_USD, decimal_places=6
    )
    max_steps_per_run: int | None = Field(default=None, ge=1, le=MAX_STEPS)


class AgentSpec(_Section):
    """A complete agent spec (what ``validate`` checks a draft against)."""

    identity: Identity
    role: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_REASON, pattern=r"^[^\x00]*$"),
        UnicodeText,
    ]
    model: ModelRuntime
    tools: list[Tool] = Field(default_factory=list, max_length=MAX_TOOLS)
    memory: Memory = Field(default_factory=Memory)
    triggers: list[Trigger] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    limits: Limits = Field(default_factory=Limits)
    policies: list[Name] = Field(default_factory=list, max_length=MAX_POLICIES)
    """Policy ids the agent is expected to be governed by (recorded, shown in diffs)."""


SPEC_SECTIONS: frozenset[str] = frozenset(AgentSpec.model_fields)


def spec_hash(spec: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the spec's RFC 8785 bytes: equal specs hash equal, whatever their key
    order (what makes a draft's autosave idempotent)."""
    return "sha256:" + hashlib.sha256(canonical_json(spec)).hexdigest()
