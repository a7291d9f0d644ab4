"""Full exports of event streams with their hash chains and proof up to a signed checkpoint.

An export is NDJSON, one record a line, each with a ``kind``:

* ``header``: the format and its version, what was exported (``subject``: a run or a workflow
  execution), the tenant, when, and the streams it holds;
* ``event``: one stored event (``event``: the envelope with ``position`` and ``recorded_at``) with
  its ``prev_hash``, ``hash`` and ``hash_scheme``, in store order (ascending ``position``);
* ``checkpoint``: the newest ``anchor.checkpointed`` event (its payload carries the Merkle root
  over every stream head at its horizon, the number of streams, the signing key's id and the
  ed25519 signature), with its own hashes;
* ``proof``: per exported stream, the head the checkpoint covers (version and hash) and its RFC
  6962 inclusion proof (leaf index, tree size, audit path), or ``anchored: false`` for a stream
  whose first event is newer than the checkpoint;
* ``end``: how many events and, per stream, the last version and hash; a file without it was cut.

:func:`verify_export` checks a file with nothing but the trusted public key: every stream's chain
from its first version, the store order, the checkpoint's signature, each head's inclusion in the
signed root, and the end record. Each problem is a :class:`ExportFinding` of a named kind. Events
after a stream's checkpointed head are proved by the chain from that head only: removing them
from the end of a stream and rewriting the ``end`` record cannot be told from an older export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from libs.contracts.envelope import EventEnvelope
from libs.eventbus.anchor import merkle_leaf, signature_problem
from libs.eventbus.store import GENESIS, event_hash

FORMAT = "mission-control.export"
FORMAT_VERSION = 1
CHECKPOINT_EVENT = "anchor.checkpointed"

ExportFindingKind = Literal[
    "truncated",
    "malformed",
    "edited_event",
    "removed_event",
    "reordered_events",
    "checkpoint_missing",
    "checkpoint_signature",
    "inclusion_proof",
    "unanchored",
]


# --- Merkle inclusion proofs (RFC 6962 section 2.1.1; RFC 9162 section 2.1.3.2) -------------------


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree over ``leaves``, leaves first, root last: each level pairs the one
    below and carries a lone last node up unchanged, which builds RFC 6962's tree (split at the
    largest power of two below n) bottom up, in one pass."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def merkle_path(
    leaves: Sequence[bytes], index: int, levels: list[list[bytes]] | None = None
) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree over ``leaves``, leaf end first (``levels``:
    :func:`merkle_levels` of ``leaves``, for many paths of one tree)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)}")
    path: list[bytes] = []
    for level in (levels or merkle_levels(leaves))[:-1]:
        if index ^ 1 < len(level):
            path.append(level[index ^ 1])
        index >>= 1
    return path


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that ``leaf`` at ``index`` in a tree of ``size`` leaves proves with ``path``
    (``None`` when the path cannot belong to such a tree)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


# --- records -------------------------------------------------------------------------------------


def header_record(
    subject_type: str, subject_id: str, tenant_id: str, created_at: str, streams: Sequence[str]
) -> dict[str, Any]:
    """The first line of an export."""
    return {
        "kind": "header",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "subject": {"type": subject_type, "id": subject_id},
        "tenant_id": tenant_id,
        "created_at": created_at,
        "streams": list(streams),
    }


def event_record(
    env: EventEnvelope, prev_hash: bytes, hash_: bytes, scheme: int, kind: str = "event"
) -> dict[str, Any]:
    """One stored event with its link in its stream's chain."""
    return {
        "kind": kind,
        "event": env.model_dump(mode="json"),
        "prev_hash": prev_hash.hex(),
        "hash": hash_.hex(),
        "hash_scheme": scheme,
    }


@dataclass(frozen=True)
class HeadTree:
    """The Merkle tree over every stream head at a checkpoint's horizon: built once, it gives
    the root to check against the checkpoint's and each stream's proof."""

    heads: dict[str, tuple[int, bytes]]
    index: dict[str, int]
    levels: list[list[bytes]]

    @classmethod
    def of(cls, heads: dict[str, tuple[int, bytes]]) -> HeadTree:
        ordered = sorted(heads, key=str.encode)
        leaves = [merkle_leaf(sid, *heads[sid]) for sid in ordered]
        return cls(heads, {sid: i for i, sid in enumerate(ordered)}, merkle_levels(leaves))

    def root(self) -> bytes:
        """The same root as :meth:`libs.eventbus.anchor.HeadsAt.root`."""
        return self.levels[-1][0] if self.levels[0] else hashlib.sha256(b"").digest()


def proof_records(
    heads: dict[str, tuple[int, bytes]] | HeadTree, stream_ids: Iterable[str]
) -> list[dict[str, Any]]:
    """The inclusion proof of each of ``stream_ids``'s head among ``heads`` (every stream head at
    a checkpoint's horizon, or their tree), or ``anchored: false`` for a stream the checkpoint
    has no head of."""
    tree = heads if isinstance(heads, HeadTree) else HeadTree.of(heads)
    leaves = tree.levels[0]
    out: list[dict[str, Any]] = []
    for sid in stream_ids:
        if sid not in tree.index:
            out.append({"kind": "proof", "stream_id": sid, "anchored": False})
            continue
        version, head = tree.heads[sid]
        out.append(
            {
                "kind": "proof",
                "stream_id": sid,
                "anchored": True,
                "head_version": version,
                "head_hash": head.hex(),
                "leaf_index": tree.index[sid],
                "tree_size": len(leaves),
                "path": [p.hex() for p in merkle_path(leaves, tree.index[sid], tree.levels)],
            }
        )
    return out


def end_record(events: int, tails: dict[str, tuple[int, bytes]]) -> dict[str, Any]:
    """The last line: the number of events and each stream's last version and hash."""
    return {
        "kind": "end",
        "events": events,
        "streams": {sid: {"version": v, "hash": h.hex()} for sid, (v, h) in sorted(tails.items())},
    }


def line(record: dict[str, Any]) -> bytes:
    """One record as an NDJSON line."""
    return orjson.dumps(record) + b"\n"


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFinding:
    """One problem of an export: its kind, where (line or stream and version), and why."""

    kind: ExportFindingKind
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.detail}"


@dataclass
class ExportReport:
    """What :func:`verify_export` found."""

    subject: str = ""
    events: int = 0
    streams: int = 0
    anchored_streams: int = 0
    checkpoint_seq: int | None = None
    findings: list[ExportFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class _Event:
    line: int
    env: EventEnvelope
    prev: bytes
    hash: bytes
    scheme: int


def _hex(v: Any) -> bytes | None:
    if not isinstance(v, str):
        return None
    try:
        return bytes.fromhex(v)
    except ValueError:
        return None


def _parse_event(rec: dict[str, Any], n: int) -> _Event | str:
    prev, hash_, scheme = _hex(rec.get("prev_hash")), _hex(rec.get("hash")), rec.get("hash_scheme")
    if prev is None or hash_ is None or not isinstance(scheme, int):
        return "prev_hash, hash or hash_scheme missing or not hex"
    try:
        env = EventEnvelope.model_validate(rec.get("event"))
    except ValidationError as exc:
        return f"event unreadable: {exc.errors()[0]['msg']}"
    if env.position is None or env.recorded_at is None:
        return "event without its store position or recorded_at"
    return _Event(n, env, prev, hash_, scheme)


def _recomputes(ev: _Event) -> bool:
    try:
        return event_hash(ev.scheme, ev.prev, ev.env) == ev.hash
    except ValueError:
        return False


def verify_export(lines: Iterable[bytes], public_key: Ed25519PublicKey) -> ExportReport:
    """Check an export's records (lines of NDJSON) offline; see the module docstring."""
    report = ExportReport()
    found = report.findings
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    checkpoint: _Event | None = None
    proofs: dict[str, dict[str, Any]] = {}
    events: list[_Event] = []
    raw = list(lines)
    for n, text in enumerate(raw, start=1):
        if not text.strip():
            continue
        try:
            rec = orjson.loads(text)
        except orjson.JSONDecodeError:
            last = n == len(raw)
            found.append(
                ExportFinding(
                    "truncated" if last else "malformed",
                    f"line {n}",
                    "the file ends in the middle of a record" if last else "not a JSON record",
                )
            )
            continue
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if end is not None:
            found.append(ExportFinding("malformed", f"line {n}", "a record after the end record"))
        if kind == "header" and header is None and n == 1:
            header = rec
        elif kind in ("event", "checkpoint"):
            parsed = _parse_event(rec, n)
            if isinstance(parsed, str):
                found.append(ExportFinding("edited_event", f"line {n}", parsed))
            elif kind == "event":
                events.append(parsed)
            else:
                checkpoint = parsed
        elif kind == "proof" and isinstance(rec.get("stream_id"), str):
            proofs[rec["stream_id"]] = rec
        elif kind == "end":
            end = rec
        else:
            found.append(ExportFinding("malformed", f"line {n}", f"unexpected record {kind!r}"))
    if header is None or header.get("format") != FORMAT:
        found.append(ExportFinding("malformed", "line 1", f"not a {FORMAT} file (no header)"))
        return report
    subject = header.get("subject") or {}
    report.subject = f"{subject.get('type')} {subject.get('id')}"
    streams = [s for s in header.get("streams", []) if isinstance(s, str)]
    report.streams, report.events = len(streams), len(events)
    if end is None:
        found.append(
            ExportFinding("truncated", "end", "the end record is missing: the file was cut short")
        )

    by_stream = _check_order(events, streams, found)
    heads_seen = _check_chains(by_stream, found)
    _check_end(end, heads_seen, len(events), found)
    _check_checkpoint(checkpoint, proofs, by_stream, streams, public_key, report)
    return report


def _check_order(
    events: list[_Event], streams: list[str], found: list[ExportFinding]
) -> dict[str, dict[int, _Event]]:
    """Events grouped per stream by version; store order and stream order checked."""
    last_position = 0
    last_version: dict[str, int] = {}
    by_stream: dict[str, dict[int, _Event]] = {sid: {} for sid in streams}
    for ev in events:
        env = ev.env
        position = env.position or 0
        where = f"line {ev.line} ({env.stream_id} v{env.stream_version})"
        if env.stream_id not in by_stream:
            found.append(
                ExportFinding("malformed", where, "its stream is not among the header's streams")
            )
            continue
        if position <= last_position or env.stream_version <= last_version.get(env.stream_id, 0):
            found.append(
                ExportFinding(
                    "reordered_events",
                    where,
                    f"position {position} comes after position {last_position} in the file: "
                    "events are out of store order",
                )
            )
        last_position = max(last_position, position)
        last_version[env.stream_id] = max(last_version.get(env.stream_id, 0), env.stream_version)
        if env.stream_version in by_stream[env.stream_id]:
            found.append(ExportFinding("malformed", where, "the same version appears twice"))
        by_stream[env.stream_id][env.stream_version] = ev
    return by_stream


def _check_chains(
    by_stream: dict[str, dict[int, _Event]], found: list[ExportFinding]
) -> dict[str, tuple[int, bytes]]:
    """Every stream's chain from version 1; returns each stream's last (version, hash)."""
    tails: dict[str, tuple[int, bytes]] = {}
    for sid, versions in by_stream.items():
        prev, expected = GENESIS, 1
        for version in sorted(versions):
            ev = versions[version]
            where = f"{sid} v{version} (line {ev.line})"
            if version != expected:
                found.append(
                    ExportFinding(
                        "removed_event",
                        where,
                        f"versions {expected} to {version - 1} are missing from the stream",
                    )
                )
            elif ev.prev != prev:
                found.append(
                    ExportFinding(
                        "edited_event", where, "prev_hash does not link to the previous event"
                    )
                )
            if not _recomputes(ev):
                found.append(
                    ExportFinding(
                        "edited_event",
                        where,
                        "its content does not match its hash (payload, actor, time or another "
                        "field was changed)",
                    )
                )
            prev, expected = ev.hash, version + 1
            tails[sid] = (version, ev.hash)
    return tails


def _check_end(
    end: dict[str, Any] | None,
    tails: dict[str, tuple[int, bytes]],
    events: int,
    found: list[ExportFinding],
) -> None:
    if end is None:
        return
    recorded = end.get("streams") if isinstance(end.get("streams"), dict) else {}
    assert isinstance(recorded, dict)
    for sid, tail in sorted(recorded.items()):
        version = tail.get("version") if isinstance(tail, dict) else None
        have = tails.get(sid)
        if have is None or not isinstance(version, int) or have[0] < version:
            last = have[0] if have else 0
            found.append(
                ExportFinding(
                    "removed_event",
                    f"{sid} v{last + 1}",
                    f"the end record says the stream ends at version {version}; the file stops "
                    f"at {last}",
                )
            )
        elif have[0] > version or have[1].hex() != tail.get("hash"):
            found.append(
                ExportFinding(
                    "edited_event",
                    f"{sid} v{have[0]}",
                    "the stream's last event is not the one the end record names",
                )
            )
    if end.get("events") != events and not found:
        found.append(
            ExportFinding(
                "removed_event",
                "end",
                f"the end record counts {end.get('events')} events; the file holds {events}",
            )
        )


def _check_checkpoint(
    checkpoint: _Event | None,
    proofs: dict[str, dict[str, Any]],
    by_stream: dict[str, dict[int, _Event]],
    streams: list[str],
    public_key: Ed25519PublicKey,
    report: ExportReport,
) -> None:
    found = report.findings
    if checkpoint is None or checkpoint.env.event_type != CHECKPOINT_EVENT:
        found.append(
            ExportFinding("checkpoint_missing", "checkpoint", "the export holds no checkpoint")
        )
        return
    payload = checkpoint.env.payload
    report.checkpoint_seq = payload.get("seq") if isinstance(payload.get("seq"), int) else None
    where = f"checkpoint {payload.get('seq')}"
    problem = signature_problem(public_key, payload)
    if problem is not None:
        found.append(ExportFinding("checkpoint_signature", where, problem))
        return
    if not _recomputes(checkpoint):
        found.append(
            ExportFinding("checkpoint_signature", where, "the checkpoint event's hash is wrong")
        )
    root = _hex(payload.get("merkle_root"))
    for sid in streams:
        proof = proofs.get(sid)
        at = f"proof of {sid}"
        if proof is None:
            found.append(ExportFinding("inclusion_proof", at, "no proof for this stream"))
            continue
        if proof.get("anchored") is False:
            found.append(
                ExportFinding(
                    "unanchored",
                    at,
                    f"no head of this stream under {where}: its events are proved by the chain "
                    "only, until a later checkpoint covers it",
                )
            )
            continue
        version, head = proof.get("head_version"), _hex(proof.get("head_hash"))
        index, size = proof.get("leaf_index"), proof.get("tree_size")
        path = [_hex(p) for p in proof.get("path") or []]
        if (
            not isinstance(version, int)
            or head is None
            or not isinstance(index, int)
            or not isinstance(size, int)
            or any(p is None for p in path)
        ):
            found.append(ExportFinding("inclusion_proof", at, "the proof is incomplete"))
            continue
        if size != payload.get("streams"):
            found.append(
                ExportFinding(
                    "inclusion_proof",
                    at,
                    f"tree size {size} is not the {payload.get('streams')} streams the "
                    "checkpoint signed",
                )
            )
            continue
        got = root_from_path(merkle_leaf(sid, version, head), index, size, [p for p in path if p])
        if got is None or got != root:
            found.append(
                ExportFinding(
                    "inclusion_proof",
                    at,
                    f"head v{version} does not prove into the signed root (a changed head hash, "
                    "index or path)",
                )
            )
            continue
        ev = by_stream.get(sid, {}).get(version)
        if ev is None:
            found.append(
                ExportFinding(
                    "removed_event",
                    f"{sid} v{version}",
                    "the checkpointed head of the stream is not in the file",
                )
            )
        elif ev.hash != head:
            found.append(
                ExportFinding(
                    "edited_event",
                    f"{sid} v{version}",
                    "the stream's chain was rewritten: its event at the checkpointed head has "
                    "another hash than the signed one",
                )
            )
        else:
            report.anchored_streams += 1
