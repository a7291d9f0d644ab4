"""The one place every limit on an event field, and on a request field that lands in one, is set.

A value the API accepts must fit every event it ends up in, or the append fails after the request
was accepted (a 500 instead of a 422). So the envelope, the gateway's request schemas and the
services' request models all take their limits from here, and the limits of a derived value are
computed from those of its parts: an agent id becomes the actor ``agent:<id>``, so the longest
agent id is the longest actor minus that prefix. ``tests/unit/test_limits.py`` holds the sums.
"""

from __future__ import annotations

# --- envelope -------------------------------------------------------------------------------------

MAX_TENANT_ID = 63
"""Tenant ids are one NATS subject token and the first part of every stream id."""
MAX_STREAM_ID = 300
MAX_CORRELATION_ID = 200
MAX_ACTOR = 200

# --- actors ---------------------------------------------------------------------------------------

AGENT_ACTOR_PREFIX = "agent:"
"""The actor of the events of a run is its agent: ``agent:<agent_id>``."""
USER_ACTOR_PREFIX = "user:"
"""The actor of a human action on an incident is who did it: ``user:<by>``."""

MAX_AGENT_ID = MAX_ACTOR - len(AGENT_ACTOR_PREFIX)
MAX_BY = MAX_ACTOR - len(USER_ACTOR_PREFIX)

# --- run and step fields --------------------------------------------------------------------------

MAX_RUN_ID = 100
"""Run ids: ``<tenant>/run/<run_id>`` must fit :data:`MAX_STREAM_ID`."""
RUN_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_RUN_ID - 1}}}$"
"""Safe in URLs, stream ids, subjects and CSV without quoting."""
AGENT_ID_PATTERN = rf"^[^\x00-\x1f\x7f\\]{{1,{MAX_AGENT_ID}}}$"
"""Free text, but no control characters or backslashes (agent ids are query filters)."""
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
"""Ids the services mint (export jobs, promotions, reloads): a lower-case UUID."""
WORKFLOW_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
"""Workflow, agent-catalogue and step names: lower case, so two spellings never name two things;
one NATS subject token (``mc.work.<tenant>.<agent>``)."""
MAX_STEP_INDEX = 1_000_000
MAX_TOKENS = 1_000_000_000
"""Tokens of one step or one estimate: sums of many stay far inside 64 bits."""
MAX_NAME = 200
"""Model and tool names."""
MAX_KIND = 100
MAX_REASON = 2000
"""Why a run finished, how an incident was resolved."""
MAX_LABELS = 50
MAX_LABEL_KEY = 100
MAX_LABEL_VALUE = 500
MAX_JSON_DEPTH = 64
"""Free JSON in a step (``input``, ``output``): nesting depth, well under the 255 levels orjson
encodes with the envelope around it."""


def agent_actor(agent_id: str) -> str:
    """The actor of the events of ``agent_id``'s runs."""
    return f"{AGENT_ACTOR_PREFIX}{agent_id}"


def user_actor(by: str) -> str:
    """The actor of an incident acknowledged or resolved by ``by``."""
    return f"{USER_ACTOR_PREFIX}{by}"
