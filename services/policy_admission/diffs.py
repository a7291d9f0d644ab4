"""Diffs of two bundles or two agent specs (``POST /v1/diffs``), paged by their hash, and their
acknowledgements.

A diff is computed by :mod:`libs.diffing` (pure, CPU only, off the event loop). What was asked
for is kept in ``policy_admission.diffs`` by (tenant, ``diff_hash``), with what it compared, its
counts and who asked for it last, so ``list_diffs`` lists a tenant's diffs without computing
any; the rows are kept in memory (the last :data:`CACHE_SIZE` diffs) and computed again from the
request by any replica that does not hold them, which gives the same rows and hash.

Acknowledgements: ``policy.diff_acknowledged`` in ``<tenant>/policy/diff-<hex>`` (category
``policy``), one per person and diff; the pure decision is :func:`acknowledge`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from libs import diffing
from libs import policy_bundles as artifacts
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import PolicyDiffAcknowledged
from libs.errors import InvalidInput, NotFound
from libs.eventbus.db import transaction
from libs.eventbus.repository import Aggregate, EventMeta, Recorded, Repository
from libs.eventbus.store import EventStore
from services.policy_admission.listing import Page, page_of

POLICY_CATEGORY = "policy"
CACHE_SIZE = 16
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
"""Each JSON document compared, encoded (the gateway holds the same bound)."""

ReadArchive = Callable[[str, str], Awaitable[bytes]]


def diff_entity(diff_hash: str) -> str:
    """The entity id of a diff's acknowledgements."""
    return "diff-" + diff_hash.removeprefix("sha256:")


# --- acknowledgements (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Acknowledgements:
    """Who acknowledged a diff, and when, in the order they did."""

    items: tuple[tuple[str, datetime], ...] = ()

    def by(self, actor: str) -> datetime | None:
        """When ``actor`` acknowledged it, if they did."""
        return next((at for who, at in self.items if who == actor), None)


def _fold(state: Acknowledgements, recorded: Sequence[Recorded]) -> Acknowledgements:
    items = list(state.items)
    for r in recorded:
        if isinstance(r.event, PolicyDiffAcknowledged):
            items.append((r.event.acknowledged_by, r.event.acknowledged_at))
    return Acknowledgements(tuple(items))


ACKS = Aggregate[Acknowledgements](
    category=POLICY_CATEGORY, initial=lambda t, i: Acknowledgements(), fold=_fold
)


def acknowledge(
    state: Acknowledgements, diff: diffing.Diff, actor: str, now: datetime
) -> list[DomainEvent]:
    """``policy.diff_acknowledged`` for ``actor``, unless they acknowledged this diff already."""
    if state.by(actor) is not None:
        return []
    return [
        PolicyDiffAcknowledged(
            diff_hash=diff.diff_hash,
            kind=diff.kind,
            old=dict(diff.old),
            new=dict(diff.new),
            acknowledged_by=actor,
            acknowledged_at=now,
        )
    ]


def acknowledgements_view(diff_hash: str, state: Acknowledgements) -> dict[str, Any]:
    """The answer of an acknowledgement: who acknowledged the diff, and when."""
    return {
        "diff_hash": diff_hash,
        "acknowledgements": [
            {"actor": who, "acknowledged_at": at.isoformat()} for who, at in state.items
        ],
    }


# --- computing ------------------------------------------------------------------------------------


def _document_size(document: Any, which: str) -> None:
    size = len(orjson.dumps(document))
    if size > MAX_DOCUMENT_BYTES:
        raise diffing.DiffTooLarge(
            f"diff_document_too_large: the {which} document is {size:,} bytes, over the "
            f"{MAX_DOCUMENT_BYTES:,} allowed"
        )


def compute(request: Mapping[str, Any], archives: Mapping[str, bytes]) -> diffing.Diff:
    """The diff ``request`` asks for (``archives``: digest → archive of the bundles it names).
    CPU only."""
    if request["kind"] == "bundles":
        old, new = request["old_digest"], request["new_digest"]
        return diffing.diff_bundles(
            artifacts.extract(archives[old]),
            artifacts.extract(archives[new]),
            old_digest=old,
            new_digest=new,
            locked=request.get("locked_fields", ()),
        )
    _document_size(request["old"], "old")
    _document_size(request["new"], "new")
    return diffing.diff_documents(
        request["old"],
        request["new"],
        locked_fields=request.get("locked_fields", ()),
        enforced_fields=request.get("enforced_fields", ()),
    )


class Diffs:
    """Computes, keeps and pages a tenant's diffs; records their acknowledgements."""

    def __init__(self, store: EventStore, read_archive: ReadArchive) -> None:
        self.store = store
        self.read_archive = read_archive
        self.acks = Repository(store, ACKS, max_retries=4)
        self._cache: OrderedDict[tuple[str, str], diffing.Diff] = OrderedDict()

    async def _compute(self, tenant_id: str, request: Mapping[str, Any]) -> diffing.Diff:
        archives: dict[str, bytes] = {}
        if request["kind"] == "bundles":
            for digest in (request["old_digest"], request["new_digest"]):
                if digest not in archives:
                    archives[digest] = await self.read_archive(tenant_id, digest)
        return await asyncio.to_thread(compute, request, archives)

    def _keep(self, tenant_id: str, diff: diffing.Diff) -> None:
        self._cache[(tenant_id, diff.diff_hash)] = diff
        self._cache.move_to_end((tenant_id, diff.diff_hash))
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def create(
        self,
        tenant_id: str,
        request: Mapping[str, Any],
        actor: str,
        *,
        limit: int,
        view: diffing.View,
    ) -> dict[str, Any]:
        """Compute the diff, keep what was asked by its hash (with what it compared, its counts
        and who asked: the listing's row), answer its summary and first page."""
        diff = await self._compute(tenant_id, request)
        async with transaction(self.store.pool) as conn:
            # Asked for again: the same row, now the most recently asked for, by this actor.
            await conn.execute(
                "INSERT INTO policy_admission.diffs (tenant_id, diff_hash, request, kind,"
                " old_identity, new_identity, summary, requested_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (tenant_id, diff_hash) DO UPDATE SET"
                " kind = EXCLUDED.kind, old_identity = EXCLUDED.old_identity,"
                " new_identity = EXCLUDED.new_identity, summary = EXCLUDED.summary,"
                " requested_by = EXCLUDED.requested_by, requested_at = now()",
                (
                    tenant_id, diff.diff_hash, orjson.dumps(dict(request)), diff.kind,
                    Jsonb(dict(diff.old)), Jsonb(dict(diff.new)), Jsonb(diff.summary()), actor,
                ),
            )  # fmt: skip
        self._keep(tenant_id, diff)
        return _answer(diff, diffing.page(diff, cursor=None, limit=limit, view=view))

    async def listing(self, tenant_id: str, page: Page) -> dict[str, Any]:
        """The tenant's diffs without their rows, the most recently asked for first, and the
        next page's cursor."""
        after_at, after_hash = page.after or (None, None)
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT diff_hash, kind, old_identity, new_identity, summary, requested_by,"
                " requested_at, created_at FROM policy_admission.diffs"
                " WHERE tenant_id = %(tenant)s AND (%(after_at)s::timestamptz IS NULL"
                "      OR (requested_at, diff_hash) < (%(after_at)s, %(after_hash)s::text))"
                " ORDER BY requested_at DESC, diff_hash DESC LIMIT %(limit)s",
                {
                    "tenant": tenant_id, "after_at": after_at, "after_hash": after_hash,
                    "limit": page.limit + 1,
                },
            )  # fmt: skip
            rows = await cur.fetchall()
        shown, cursor = page_of(rows, page, "requested_at", "diff_hash")
        return {"diffs": [_listed(r) for r in shown], "next_cursor": cursor}

    async def load(self, tenant_id: str, diff_hash: str) -> diffing.Diff:
        """The diff with ``diff_hash`` (from memory, else computed again); 404
        ``diff_not_found``."""
        cached = self._cache.get((tenant_id, diff_hash))
        if cached is not None:
            self._cache.move_to_end((tenant_id, diff_hash))
            return cached
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT request FROM policy_admission.diffs "
                "WHERE tenant_id = %s AND diff_hash = %s",
                (tenant_id, diff_hash),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"diff_not_found: no diff {diff_hash}; ask for it with POST /v1/diffs first"
            )
        diff = await self._compute(tenant_id, orjson.loads(bytes(row["request"])))
        if diff.diff_hash != diff_hash:  # pragma: no cover - the computation is pure
            raise InvalidInput(f"diff_not_found: diff {diff_hash} no longer computes the same")
        self._keep(tenant_id, diff)
        return diff

    async def get(
        self,
        tenant_id: str,
        diff_hash: str,
        *,
        cursor: str | None,
        limit: int,
        view: diffing.View,
    ) -> dict[str, Any]:
        """A page of the diff's rows."""
        diff = await self.load(tenant_id, diff_hash)
        return _answer(diff, diffing.page(diff, cursor=cursor, limit=limit, view=view))

    async def acknowledge(
        self, tenant_id: str, diff_hash: str, actor: str, now: datetime
    ) -> dict[str, Any]:
        """Record that ``actor`` viewed the diff (once per actor)."""
        diff = await self.load(tenant_id, diff_hash)
        state, _ = await self.acks.execute(
            tenant_id,
            diff_entity(diff_hash),
            lambda s: acknowledge(s, diff, actor, now),
            EventMeta(correlation_id=diff_hash, actor=actor),
        )
        return acknowledgements_view(diff_hash, state)

    async def acknowledgements(self, tenant_id: str, diff_hash: str) -> Acknowledgements:
        """Who acknowledged the diff (for promotions)."""
        return await self.acks.load(tenant_id, diff_entity(diff_hash))


def _listed(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "diff_hash": row["diff_hash"],
        "kind": row["kind"],
        "old": row["old_identity"],
        "new": row["new_identity"],
        "summary": row["summary"],
        "requested_by": row["requested_by"],
        "requested_at": row["requested_at"].astimezone(UTC).isoformat(),
        "created_at": row["created_at"].astimezone(UTC).isoformat(),
    }


def _answer(diff: diffing.Diff, page: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": diff.kind,
        "old": dict(diff.old),
        "new": dict(diff.new),
        "summary": diff.summary(),
        **page,
    }
