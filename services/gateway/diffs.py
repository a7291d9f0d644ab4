"""Request and answer shapes of the gateway's diff routes (in ``entrypoints``): ``POST
/v1/diffs``, ``GET /v1/diffs``, ``GET /v1/diffs/{diff_hash}`` and ``POST
/v1/diffs/{diff_hash}/acknowledge``. They forward to policy-admission (``mc.rpc.admission.*_diff``
and ``list_diffs``) with the caller's tenant. See ``docs/policies.md``, "Diffs".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs import diffing
from libs.contracts.limits import MAX_NAME
from libs.contracts.policy import BUNDLE_DIGEST_PATTERN
from libs.errors import InvalidInput, TooLarge
from services.gateway.schemas import Json, NoNul

DIFF_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
"""Each agent spec compared, encoded as JSON (policy-admission holds the same bound)."""
DIFF_TIMEOUT_S = 30.0
"""Extracting two bundles and diffing 10,000s of rows takes more than an ordinary request."""

View = Literal["structured", "side-by-side"]
FieldName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME), NoNul]
Digest = Annotated[str, StringConstraints(pattern=BUNDLE_DIGEST_PATTERN)]
DiffHashPath = Annotated[
    str, Path(pattern=DIFF_HASH_PATTERN, description="The diff's hash, sha256:<64 hex>.")
]
DiffCursorQuery = Annotated[
    str | None,
    Query(
        pattern=CURSOR_PATTERN,
        description="Where the page starts: the `next_cursor` of the previous page.",
    ),
]
LimitQuery = Annotated[
    int, Query(ge=1, le=diffing.MAX_LIMIT, description="Rows per page, 1 to 1000.")
]
ViewQuery = Annotated[
    View, Query(description="structured (old and new values) or side-by-side (left and right).")
]


class DiffIn(BaseModel):
    """Two bundles of the tenant (``old_digest``, ``new_digest``) or two agent specs
    (``old_spec``, ``new_spec``: JSON documents) to compare; name one pair.

    ``locked_fields`` marks rows as locked: for specs, fields as pointers (``/limits/max_tokens``)
    or dotted (``limits.max_tokens``), e.g. a governed agent's ``locked_fields``; for bundles,
    file paths or policy ids. ``enforced_fields`` marks spec fields a policy enforces (a bundle's
    rows are marked from its files).
    """

    model_config = ConfigDict(extra="forbid")

    old_digest: Digest | None = None
    new_digest: Digest | None = None
    old_spec: Json | None = None
    new_spec: Json | None = None
    # Two stored agent versions are diffed as their specs, read first from
    # GET /v1/agents/{agent_id}/versions/{version}. Naming `agent_id` with two versions here
    # instead would spare the client those reads; the newest version's spec changes with each
    # draft save, so the request kept by its hash would still have to hold the specs.
    locked_fields: list[FieldName] = Field(default_factory=list, max_length=diffing.MAX_FIELDS)
    enforced_fields: list[FieldName] = Field(default_factory=list, max_length=diffing.MAX_FIELDS)
    limit: int = Field(default=diffing.DEFAULT_LIMIT, ge=1, le=diffing.MAX_LIMIT)
    view: View = "structured"


def diff_payload(body: DiffIn) -> dict[str, Any]:
    """The ``create_diff`` request; ``diff_inputs_invalid`` unless exactly one pair is named,
    413 ``diff_document_too_large`` for a spec over :data:`MAX_DOCUMENT_BYTES`."""
    bundles = (body.old_digest, body.new_digest)
    specs = (body.old_spec, body.new_spec)
    has_bundles = any(v is not None for v in bundles)
    has_specs = any(v is not None for v in specs)
    if has_bundles == has_specs or None in (bundles if has_bundles else specs):
        raise InvalidInput(
            "diff_inputs_invalid: name either old_digest and new_digest (two bundles) or "
            "old_spec and new_spec (two agent specs)"
        )
    common = {
        "locked_fields": body.locked_fields,
        "enforced_fields": body.enforced_fields,
        "limit": body.limit,
        "view": body.view,
    }
    if has_bundles:
        return {"kind": "bundles", "old_digest": bundles[0], "new_digest": bundles[1], **common}
    for which, spec in (("old_spec", specs[0]), ("new_spec", specs[1])):
        size = len(orjson.dumps(spec))
        if size > MAX_DOCUMENT_BYTES:
            raise TooLarge(
                f"diff_document_too_large: {which} is {size:,} bytes, over the "
                f"{MAX_DOCUMENT_BYTES:,} allowed"
            )
    return {"kind": "documents", "old": specs[0], "new": specs[1], **common}


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class DiffCell(_Result):
    """One side of a side-by-side row: its line number (text files) and text (a value as
    compact JSON); ``text`` is null when ``truncated`` (over 16 KiB)."""

    line: int | None
    text: str | None
    truncated: bool


class DiffRow(_Result):
    """One change. Structured rows carry ``old``, ``new``, ``old_line``, ``new_line``;
    side-by-side rows carry ``left`` and ``right`` (null on the side without the item)."""

    index: int
    section: str
    kind: Literal["file", "value", "line"]
    path: str
    change: Literal["added", "removed", "changed"]
    locked: bool
    enforced: bool
    policies: list[str]
    notes: list[str]
    old: Any = None
    new: Any = None
    old_line: int | None = None
    new_line: int | None = None
    truncated: bool | None = None
    left: DiffCell | None = None
    right: DiffCell | None = None


class DiffSummary(_Result):
    """How many rows, by change, locked and enforced; for bundles, files by change."""

    rows: int
    added: int
    removed: int
    changed: int
    locked: int
    enforced: int
    files: dict[str, int] | None = None


class DiffPage(_Result):
    """A diff's identity (``diff_hash``, the inputs), summary, and one page of rows from
    ``offset``; ``next_cursor`` is null on the last page."""

    diff_hash: str
    kind: Literal["bundles", "documents"]
    old: dict[str, str]
    new: dict[str, str]
    summary: DiffSummary
    view: View
    offset: int
    total: int
    rows: list[DiffRow]
    next_cursor: str | None


class DiffListed(_Result):
    """A diff in a listing, without its rows: what it compared (``old`` and ``new``: two
    bundle digests, or two agent specs' hashes), its counts, and who asked for it last and
    when. Diffs stored before listings existed may lack these (null)."""

    diff_hash: str
    kind: Literal["bundles", "documents"] | None
    old: dict[str, str] | None
    new: dict[str, str] | None
    summary: DiffSummary | None
    requested_by: str | None
    requested_at: str
    created_at: str


class DiffListing(_Result):
    """A page of the tenant's diffs, the most recently asked for first; pass ``next_cursor``
    as ``cursor`` for the next (null: this is the last page)."""

    diffs: list[DiffListed]
    next_cursor: str | None


class DiffAcknowledgement(_Result):
    """Who acknowledged having viewed the diff, and when."""

    actor: str
    acknowledged_at: str


class DiffAcknowledgements(_Result):
    """A diff's acknowledgements, in the order they were given."""

    diff_hash: str
    acknowledgements: list[DiffAcknowledgement]
