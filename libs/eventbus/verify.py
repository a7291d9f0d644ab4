"""Verification of the event store: hash chains, stream heads and signed checkpoints.

What is checked, in one REPEATABLE READ snapshot (so appends running meanwhile are never
mistaken for damage), and what each finding is called:

* every stream's chain, in version order: the versions run 1, 2, 3 ... (``missing_events``), each
  ``prev_hash`` is the previous row's hash and each row's hash recomputes under its
  ``hash_scheme`` (``edited_row``). Scheme 2 covers ``position`` and ``recorded_at``, so a row
  whose hash would recompute with another broken row's position is a ``reordered_position``, as
  is a stream whose positions do not increase with its versions. A scheme-1 row at or after the
  position where scheme 2 started, which no append writes, is a ``scheme_downgrade``;
* every stream against its head in ``eventstore.stream_heads``: events missing after the last
  one stored (``truncated_tail``), a head whose stream has no event left (``deleted_stream``), a
  stream with no head or a head that names another last event (``head_mismatch``);
* every checkpoint's ed25519 signature under the trusted public key (``checkpoint_signature``),
  and the Merkle root of the newest validly signed one against the heads recomputed from the
  events at its horizon (``checkpoint_mismatch``): this catches a truncated tail, a deleted stream
  or a rewritten chain even when the heads table was doctored to match.

A chain alone cannot stop someone with write access who recomputes hashes; what they change
before the next checkpoint is covered only by the heads table, what they change under an
existing checkpoint is found by its root. See ``libs/eventbus/anchor.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg.rows import dict_row

from libs.contracts.canonical import canonical_json
from libs.eventbus.anchor import CHECKPOINT_STREAM, HeadsAt, signature_problem
from libs.eventbus.store import (
    GENESIS,
    HASH_SCHEME,
    HASH_SCHEME_V1,
    chain_hash,
    link_hash,
    row_to_envelope,
)

FindingKind = Literal[
    "edited_row",
    "reordered_position",
    "missing_events",
    "scheme_downgrade",
    "truncated_tail",
    "deleted_stream",
    "head_mismatch",
    "checkpoint_signature",
    "checkpoint_mismatch",
]
# At most this many rows whose hash does not recompute are kept to look for swapped positions.
_SUSPECTS_MAX = 2000


@dataclass(frozen=True)
class Finding:
    """One thing wrong: its kind, where (stream and version; 0 for a whole stream), and why."""

    kind: FindingKind
    stream_id: str
    version: int
    detail: str

    def __str__(self) -> str:
        where = f"{self.stream_id} at version {self.version}" if self.version else self.stream_id
        return f"{self.kind}: stream {where}: {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification."""

    streams: int
    events: int
    findings: list[Finding] = field(default_factory=list)
    checkpoints: int = 0
    """Checkpoints whose signature was checked."""
    anchored: int | None = None
    """Sequence number of the checkpoint whose root was recomputed and matched, if any."""
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_broken(self) -> tuple[str, int, str] | None:
        """(stream_id, version, reason) of the first finding, or None."""
        if not self.findings:
            return None
        f = self.findings[0]
        return (f.stream_id, f.version, f"{f.kind}: {f.detail}")


@dataclass
class _Suspect:
    stream_id: str
    version: int
    prev: bytes
    content: bytes
    position: int
    recorded_at: Any
    stored: bytes


def verify_chains(
    database_url: str,
    *,
    stream_id: str | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> VerifyReport:
    """Check every stream (or one) and, for the whole store, its heads and checkpoints.

    ``public_key`` is the trusted key checkpoints must be signed with; without it their
    signatures are not checked (and no root is trusted).
    """
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            return verify_in(conn, stream_id=stream_id, public_key=public_key)


def verify_in(
    conn: psycopg.Connection[dict[str, Any]],
    *,
    stream_id: str | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> VerifyReport:
    """:func:`verify_chains` in the caller's transaction on ``conn`` (rows as dicts), which
    should be REPEATABLE READ so that the heads and the events are read in one snapshot."""
    findings: list[Finding] = []
    where = "WHERE stream_id = %s " if stream_id else ""
    args: tuple[str, ...] = (stream_id,) if stream_id else ()
    heads: dict[str, tuple[int, bytes]] = {
        r["stream_id"]: (int(r["last_version"]), bytes(r["last_hash"]))
        for r in conn.execute(
            f"SELECT stream_id, last_version, last_hash FROM eventstore.stream_heads {where}", args
        )
    }
    # Scheme 2 starts where migration 0004 recorded, and no later than the first scheme-2 row.
    row = conn.execute(
        "SELECT least((SELECT first_position FROM eventstore.hash_schemes WHERE scheme = %s), "
        "(SELECT min(position) + 1 FROM eventstore.events WHERE hash_scheme = %s)) AS p",
        (HASH_SCHEME, HASH_SCHEME),
    ).fetchone()
    first_v2 = row["p"] if row and row["p"] is not None else None

    # The checkpoints first: the newest validly signed one sets the horizon to recompute at.
    checkpoints = 0
    anchor: dict[str, Any] | None = None
    if stream_id is None and public_key is not None:
        for cp in conn.execute(
            "SELECT stream_version, payload FROM eventstore.events WHERE stream_id = %s "
            "ORDER BY stream_version",
            (CHECKPOINT_STREAM,),
        ):
            checkpoints += 1
            problem = signature_problem(public_key, cp["payload"])
            if problem is not None:
                findings.append(
                    Finding(
                        "checkpoint_signature",
                        CHECKPOINT_STREAM,
                        int(cp["stream_version"]),
                        problem,
                    )
                )
            else:
                anchor = cp["payload"]
    horizon = int(anchor["horizon_xid"]) if anchor is not None else None
    # Each stream's last event below that horizon: what the checkpoint's leaves must be.
    below: dict[str, tuple[int, bytes]] = {}

    suspects: list[_Suspect] = []
    streams = events = 0
    current: str | None = None
    prev = GENESIS
    expected_version = 1
    last_position = 0
    seen_v2 = False
    last: tuple[int, bytes] | None = None

    def end_stream(sid: str, tail: tuple[int, bytes] | None) -> None:
        head = heads.pop(sid, None)
        if tail is None:
            return
        if head is None:
            findings.append(Finding("head_mismatch", sid, tail[0], "the stream has no head row"))
        elif head[0] > tail[0]:
            findings.append(
                Finding(
                    "truncated_tail",
                    sid,
                    tail[0] + 1,
                    f"the stream ends at version {tail[0]} but its head records version "
                    f"{head[0]}: {head[0] - tail[0]} event(s) deleted from its end",
                )
            )
        elif head[0] < tail[0] or head[1] != tail[1]:
            findings.append(
                Finding(
                    "head_mismatch",
                    sid,
                    tail[0],
                    f"its head records version {head[0]} with another hash than the stream's "
                    "last event",
                )
            )

    with conn.cursor(name="verify") as cur:
        cur.itersize = 5000
        cur.execute(
            "SELECT position, event_id, event_type, schema_version, tenant_id, stream_id, "
            "stream_version, occurred_at, recorded_at, correlation_id, causation_id, actor, "
            "trace_context, payload, prev_hash, hash, hash_scheme, log_xid::text AS xid "
            f"FROM eventstore.events {where}ORDER BY stream_id, stream_version",
            args,
        )
        for row in cur:
            sid = row["stream_id"]
            if sid != current:
                if current is not None:
                    end_stream(current, last)
                current, prev, expected_version, last_position = sid, GENESIS, 1, 0
                seen_v2, last = False, None
                streams += 1
            events += 1
            version = int(row["stream_version"])
            stored = bytes(row["hash"])
            position = int(row["position"])
            scheme = int(row["hash_scheme"])
            linked = True
            if version != expected_version:
                findings.append(
                    Finding(
                        "missing_events",
                        sid,
                        version,
                        f"versions {expected_version} to {version - 1} are missing",
                    )
                )
                linked = False
            if position <= last_position:
                findings.append(
                    Finding(
                        "reordered_position",
                        sid,
                        version,
                        f"position {position} is not after the previous version's {last_position}",
                    )
                )
            if scheme == HASH_SCHEME_V1 and (
                seen_v2 or (first_v2 is not None and position >= first_v2)
            ):
                findings.append(
                    Finding(
                        "scheme_downgrade",
                        sid,
                        version,
                        "a scheme-1 hash (not covering position and recorded_at) on a row "
                        "stored after scheme 2 was in use",
                    )
                )
            seen_v2 = seen_v2 or scheme == HASH_SCHEME
            if linked and bytes(row["prev_hash"]) != prev:
                findings.append(
                    Finding(
                        "edited_row", sid, version, "prev_hash does not link to the previous row"
                    )
                )
            elif linked:
                problem = _check_row(row, prev, scheme, stored, suspects)
                if problem is not None:
                    findings.append(Finding("edited_row", sid, version, problem))
            prev, expected_version = stored, version + 1
            last_position = max(last_position, position)
            last = (version, stored)
            if horizon is not None and int(row["xid"]) < horizon:
                below[sid] = (version, stored)
        if current is not None:
            end_stream(current, last)
    for sid, (version, _) in sorted(heads.items()):
        findings.append(
            Finding(
                "deleted_stream",
                sid,
                0,
                f"its head records version {version} but no event of it is stored",
            )
        )
    findings = _name_swaps(findings, suspects)
    anchored = None
    if anchor is not None and horizon is not None:
        got = HeadsAt(horizon, below)
        if got.root().hex() != anchor["merkle_root"]:
            findings.append(
                Finding(
                    "checkpoint_mismatch",
                    CHECKPOINT_STREAM,
                    int(anchor["seq"]),
                    f"checkpoint {anchor['seq']} signed a root over {anchor['streams']} streams "
                    f"and {anchor['events']} events; the store now has {len(got.heads)} streams "
                    f"and {got.events} events below its horizon, with another root: events were "
                    "deleted or rewritten before it",
                )
            )
        else:
            anchored = int(anchor["seq"])
    return VerifyReport(
        streams,
        events,
        findings,
        checkpoints,
        anchored,
        signatures_checked=public_key is not None,
    )


def _check_row(
    row: dict[str, Any], prev: bytes, scheme: int, stored: bytes, suspects: list[_Suspect]
) -> str | None:
    """Why one linked row's hash does not recompute (``None`` when it does)."""
    try:
        env = row_to_envelope(row)
        body = canonical_json(env.hashed_fields())
    except ValueError as exc:  # a tampered row may no longer even parse
        return f"unreadable: {exc}"
    if scheme == HASH_SCHEME_V1:
        computed = chain_hash(prev, env, body)
    elif scheme == HASH_SCHEME:
        content = hashlib.sha256(body).digest()
        computed = link_hash(prev, content, int(row["position"]), row["recorded_at"])
        if computed != stored and len(suspects) < _SUSPECTS_MAX:
            suspects.append(
                _Suspect(
                    env.stream_id,
                    env.stream_version,
                    prev,
                    content,
                    int(row["position"]),
                    row["recorded_at"],
                    stored,
                )
            )
    else:
        return f"unknown hash scheme {scheme}"
    if computed != stored:
        return "content does not match its hash (payload, actor, recorded_at or another field)"
    return None


def _name_swaps(findings: list[Finding], suspects: list[_Suspect]) -> list[Finding]:
    """Rename the ``edited_row`` findings of rows whose hash holds at another suspect's position
    (those rows were not edited, their positions were swapped), and drop repeated findings."""
    swapped: dict[tuple[str, int], int] = {}
    for s in suspects:
        for other in suspects:
            if other is s:
                continue
            if link_hash(s.prev, s.content, other.position, s.recorded_at) == s.stored:
                swapped[(s.stream_id, s.version)] = other.position
                break
    out: list[Finding] = []
    for f in findings:
        was = swapped.get((f.stream_id, f.version))
        if f.kind == "edited_row" and was is not None:
            f = Finding(
                "reordered_position",
                f.stream_id,
                f.version,
                f"it was hashed at position {was}, which another event now holds",
            )
        if f not in out:
            out.append(f)
    return out
