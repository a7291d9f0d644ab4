"""Structured diffs of two JSON documents (agent specs) or two policy bundles, with a stable hash.

Pure: no I/O. policy-admission computes diffs with it (``POST /v1/diffs``) and pages their rows;
``docs/policies.md`` ("Diffs") describes what a caller sees.

**Rows.** A diff is an ordered tuple of :class:`Row`, each one change:

* ``kind="value"``: a JSON value at ``path`` (an RFC 6901 pointer) was ``added``, ``removed`` or
  ``changed``, with its ``old`` and ``new`` value. An added or removed object is one row holding
  the whole object; objects are compared key by key, lists element by element (equal elements
  are matched first, so one insertion does not shift every later element into a change).
* ``kind="line"``: a line of a text file (Rego, Markdown) with its ``old_line`` and
  ``new_line`` numbers. A replaced block pairs its old and new lines one to one (``changed``),
  the rest are ``removed`` or ``added``: exactly the rows of a side-by-side view.
* ``kind="file"``: a bundle file added, removed or changed; ``old`` and ``new`` are the sha256
  of its bytes. Its content rows follow it (``section`` is the file's path).

**Order** is stable: bundle files by path; within a file, lines in file order and JSON values
depth first with object keys sorted; documents likewise.

**Marks.** ``locked`` rows touch a field (or, in a bundle, a file or policy) the caller names
as locked: at, under or above it. ``enforced`` rows change what admission decides: in a
bundle, Rego modules other than tests and ``data.json``; in a document, the fields the caller
names as enforced. ``policies`` lists the policy ids a Rego file defines (from its
``METADATA`` ``id`` or its ``metadata`` rule); ``notes`` says why a row is marked.

**Hash.** ``diff_hash`` is ``sha256:<hex>`` of the RFC 8785 canonical JSON of the inputs'
identities (bundle digests, or the sha256 of each document's canonical JSON) and every row:
the same inputs give the same hash in any process.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import rfc8785

from libs.contracts.canonical import canonical_json
from libs.errors import InvalidInput, TooLarge

FORMAT = 1
"""The row format the hash covers; bumped if a row's fields or their meaning change."""
MAX_ROWS = 100_000
MAX_FIELDS = 1_000
"""Locked or enforced fields a caller may name."""
MAX_LIMIT = 1_000
DEFAULT_LIMIT = 100
PAGE_BYTES = 1024 * 1024
"""A page stops before it grows past this (but holds at least one row): it travels in one
bus message."""
MAX_CELL_BYTES = 16 * 1024
"""A value or line longer than this (encoded) is shown as its size and sha256 in a page."""

Kind = Literal["documents", "bundles"]
RowKind = Literal["file", "value", "line"]
Change = Literal["added", "removed", "changed"]
View = Literal["structured", "side-by-side"]
VIEWS: tuple[View, ...] = ("structured", "side-by-side")

SIGNATURES = ".signatures.json"
_JSON_FILES = ("data.json", ".manifest")
_METADATA_ID = re.compile(r"^#\s+id:\s*([A-Za-z0-9_.:-]+)\s*$", re.MULTILINE)
_RULE_ID = re.compile(r'"id"\s*:\s*"([A-Za-z0-9_.:-]+)"')
_PACKAGE = re.compile(r"^package\s+([A-Za-z0-9_.]+)", re.MULTILINE)
_MISSING: Any = object()


class DiffTooLarge(TooLarge):
    """More rows than :data:`MAX_ROWS`; 413 ``diff_too_large``."""


@dataclass(frozen=True, slots=True)
class Row:
    """One change; see the module's docstring."""

    section: str
    kind: RowKind
    path: str
    change: Change
    old: Any = None
    new: Any = None
    old_line: int | None = None
    new_line: int | None = None
    locked: bool = False
    enforced: bool = False
    policies: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The row as the hash covers it (and the structured view shows it)."""
        return {
            "section": self.section,
            "kind": self.kind,
            "path": self.path,
            "change": self.change,
            "old": self.old,
            "new": self.new,
            "old_line": self.old_line,
            "new_line": self.new_line,
            "locked": self.locked,
            "enforced": self.enforced,
            "policies": list(self.policies),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Diff:
    """Two inputs' identities, their rows in stable order, and the hash over both."""

    kind: Kind
    old: Mapping[str, str]
    new: Mapping[str, str]
    rows: tuple[Row, ...]
    diff_hash: str = field(default="")

    def summary(self) -> dict[str, Any]:
        """Counts: rows, by change, locked, enforced, and (bundles) files by change."""
        counts = {"rows": len(self.rows), "added": 0, "removed": 0, "changed": 0}
        locked = enforced = 0
        files = {"added": 0, "removed": 0, "changed": 0}
        for r in self.rows:
            if r.kind == "file":
                files[r.change] += 1
                continue
            counts[r.change] += 1
            locked += r.locked
            enforced += r.enforced
        out: dict[str, Any] = {**counts, "locked": locked, "enforced": enforced}
        if self.kind == "bundles":
            out["files"] = files
        return out


def diff_hash(
    kind: Kind, old: Mapping[str, str], new: Mapping[str, str], rows: Iterable[Row]
) -> str:
    """``sha256:<hex>`` of the RFC 8785 JSON of ``{"format", "kind", "old", "new", "rows"}``.

    Written piece by piece, in RFC 8785's key order, to the same bytes: a row whose values are
    strings, booleans, null or exact integers is RFC 8785 as orjson writes it with sorted keys
    (its other fields are such values too); any other row goes through :func:`canonical`.
    """
    digest = hashlib.sha256()
    digest.update(b'{"format":%d,"kind":' % FORMAT)
    digest.update(canonical(kind))
    digest.update(b',"new":' + canonical(dict(new)) + b',"old":' + canonical(dict(old)))
    digest.update(b',"rows":[')
    for i, r in enumerate(rows):
        if i:
            digest.update(b",")
        if _plain(r.old) and _plain(r.new):
            digest.update(orjson.dumps(r.as_dict(), option=orjson.OPT_SORT_KEYS))
        else:
            digest.update(canonical(r.as_dict()))
    digest.update(b"]}")
    return "sha256:" + digest.hexdigest()


_MAX_EXACT_INT = 2**53 - 1


def _plain(value: Any) -> bool:
    """Whether orjson writes ``value`` as RFC 8785 does."""
    if value is None or isinstance(value, str | bool):
        return True
    return type(value) is int and -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT


def canonical(value: Any) -> bytes:
    """RFC 8785 bytes of ``value``; ``diff_value_unsupported`` for what JSON cannot carry
    exactly (an integer past 2**53, a lone surrogate)."""
    try:
        return canonical_json(value)
    except (rfc8785.CanonicalizationError, ValueError, TypeError) as exc:
        raise InvalidInput(
            f"diff_value_unsupported: a value has no canonical JSON form ({exc})"
        ) from None


def document_identity(document: Any) -> str:
    """``sha256:<hex>`` of a document's RFC 8785 JSON."""
    return "sha256:" + hashlib.sha256(canonical(document)).hexdigest()


# --- field paths ---------------------------------------------------------------------------------


def pointer(parts: Sequence[str | int]) -> str:
    """The RFC 6901 pointer of ``parts`` (``""`` is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def field_parts(name: str) -> tuple[str, ...]:
    """A field as path segments: an RFC 6901 pointer (``/limits/max_tokens``) or dotted
    (``limits.max_tokens``)."""
    if name.startswith("/"):
        return tuple(p.replace("~1", "/").replace("~0", "~") for p in name[1:].split("/"))
    return tuple(p for p in name.split(".") if p)


@dataclass(frozen=True)
class _Fields:
    """Fields named by a caller, as segment tuples, with the name each came from."""

    named: tuple[tuple[tuple[str, ...], str], ...] = ()

    @classmethod
    def of(cls, names: Iterable[str]) -> _Fields:
        items = sorted(set(names))
        if len(items) > MAX_FIELDS:
            raise InvalidInput(f"diff_fields_invalid: at most {MAX_FIELDS} fields may be named")
        return cls(tuple((field_parts(n), n) for n in items))

    def hits(self, parts: Sequence[str | int]) -> list[str]:
        """The names at, under or above ``parts`` (a changed parent holds a named child)."""
        if not self.named:
            return []
        path = tuple(str(p) for p in parts)
        out = []
        for named, name in self.named:
            n = min(len(named), len(path))
            if named[:n] == path[:n]:
                out.append(name)
        return out


# --- JSON values ---------------------------------------------------------------------------------


def _same_scalar(a: Any, b: Any) -> bool:
    # JSON true is not 1: compare booleans only with booleans.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if type(a) in (int, float) and type(b) in (int, float):
        return bool(a == b)
    return type(a) is type(b) and a == b


def _key(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def json_changes(old: Any, new: Any) -> list[tuple[tuple[str | int, ...], Change, Any, Any]]:
    """(path parts, change, old, new) for every difference, in stable order."""
    out: list[tuple[tuple[str | int, ...], Change, Any, Any]] = []
    _changes(old, new, (), out)
    return out


def _changes(
    old: Any,
    new: Any,
    parts: tuple[str | int, ...],
    out: list[tuple[tuple[str | int, ...], Change, Any, Any]],
) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys()):
            a, b = old.get(k, _MISSING), new.get(k, _MISSING)
            if a is _MISSING:
                out.append(((*parts, k), "added", None, b))
            elif b is _MISSING:
                out.append(((*parts, k), "removed", a, None))
            else:
                _changes(a, b, (*parts, k), out)
    elif isinstance(old, list) and isinstance(new, list):
        _list_changes(old, new, parts, out)
    elif isinstance(old, dict | list) or isinstance(new, dict | list):
        if type(old) is not type(new):
            out.append((parts, "changed", old, new))
    elif not _same_scalar(old, new):
        out.append((parts, "changed", old, new))


def _list_changes(
    old: list[Any],
    new: list[Any],
    parts: tuple[str | int, ...],
    out: list[tuple[tuple[str | int, ...], Change, Any, Any]],
) -> None:
    a_keys, b_keys = [_key(v) for v in old], [_key(v) for v in new]
    if a_keys == b_keys:
        return
    matcher = difflib.SequenceMatcher(None, a_keys, b_keys)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for k in range(pairs):
            _changes(old[i1 + k], new[j1 + k], (*parts, j1 + k), out)
        for i in range(i1 + pairs, i2):
            out.append(((*parts, i), "removed", old[i], None))
        for j in range(j1 + pairs, j2):
            out.append(((*parts, j), "added", None, new[j]))


def diff_documents(
    old: Any,
    new: Any,
    *,
    locked_fields: Iterable[str] = (),
    enforced_fields: Iterable[str] = (),
) -> Diff:
    """The diff of two JSON documents (two agent specs): one ``value`` row per changed path.

    ``locked_fields`` and ``enforced_fields`` (pointers or dotted paths, e.g. a governed
    agent's ``locked_fields``) mark the rows at, under or above them, with a note naming the
    field.
    """
    locked, enforced = _Fields.of(locked_fields), _Fields.of(enforced_fields)
    rows: list[Row] = []
    for parts, change, a, b in json_changes(old, new):
        lk, en = locked.hits(parts), enforced.hits(parts)
        notes = tuple([f"locked: {n}" for n in lk] + [f"enforced: {n}" for n in en])
        rows.append(
            Row(
                section=str(parts[0]) if parts else "",
                kind="value",
                path=pointer(parts),
                change=change,
                old=a,
                new=b,
                locked=bool(lk),
                enforced=bool(en),
                notes=notes,
            )
        )
        _check_size(rows)
    ids = {"document": document_identity(old)}, {"document": document_identity(new)}
    return _finish("documents", ids[0], ids[1], rows)


# --- bundles -------------------------------------------------------------------------------------


def policy_ids(text: str) -> tuple[str, ...]:
    """The policy ids a Rego module defines: its ``METADATA`` ``id`` and ``metadata`` rule."""
    return tuple(sorted(set(_METADATA_ID.findall(text)) | set(_RULE_ID.findall(text))))


def _text(data: bytes | None) -> str | None:
    if data is None:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parsed_json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _MISSING


@dataclass(frozen=True)
class _FileMarks:
    enforced: bool
    locked: bool
    policies: tuple[str, ...]
    notes: tuple[str, ...]

    def row(
        self,
        section: str,
        kind: RowKind,
        path: str,
        change: Change,
        old: Any,
        new: Any,
        old_line: int | None = None,
        new_line: int | None = None,
    ) -> Row:
        """A row of this file, carrying the file's marks."""
        return Row(
            section,
            kind,
            path,
            change,
            old,
            new,
            old_line,
            new_line,
            self.locked,
            self.enforced,
            self.policies,
            self.notes,
        )


def _file_marks(
    path: str, old_text: str | None, new_text: str | None, locked: frozenset[str]
) -> _FileMarks:
    name = posixpath.basename(path)
    policies: tuple[str, ...] = ()
    notes: list[str] = []
    enforced = False
    if path.endswith(".rego"):
        texts = [t for t in (old_text, new_text) if t]
        if name.endswith("_test.rego"):
            notes.append("test module: runs at upload, decides nothing")
        else:
            enforced = True
            policies = tuple(sorted({p for t in texts for p in policy_ids(t)}))
            if policies:
                notes.append("defines policies: " + ", ".join(policies))
            else:
                packages = sorted({p for t in texts for p in _PACKAGE.findall(t)})
                notes.append("library module: " + (", ".join(packages) or "no package"))
    elif name == "data.json":
        enforced = True
        where = posixpath.dirname(path).replace("/", ".")
        notes.append("data: " + ("data." + where if where else "data") + " (limits, allowlists)")
    elif path == SIGNATURES:
        notes.append("signature: lists every file's hash, so it changes with any file")
    elif path == ".manifest":
        notes.append("manifest: revision and roots")
    names = sorted(n for n in locked if n == path or n in policies)
    if names:
        notes.append("locked: " + ", ".join(names))
    return _FileMarks(enforced, bool(names), policies, tuple(notes))


def _digest(data: bytes | None) -> str | None:
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def diff_bundles(
    old_files: Mapping[str, bytes],
    new_files: Mapping[str, bytes],
    *,
    old_digest: str,
    new_digest: str,
    locked: Iterable[str] = (),
) -> Diff:
    """The diff of two extracted bundles (path → bytes): a ``file`` row per added, removed or
    changed file, then its ``line`` rows (text) or ``value`` rows (``data.json``,
    ``.manifest``); ``.signatures.json`` and binary files get their file row only.

    ``locked`` names file paths or policy ids held locked (e.g. a tenant's baseline policies).
    """
    named = frozenset(locked)
    if len(named) > MAX_FIELDS:
        raise InvalidInput(f"diff_fields_invalid: at most {MAX_FIELDS} fields may be named")
    rows: list[Row] = []
    for path in sorted(old_files.keys() | new_files.keys()):
        a, b = old_files.get(path), new_files.get(path)
        if a == b:
            continue
        change: Change = "added" if a is None else "removed" if b is None else "changed"
        a_text, b_text = _text(a), _text(b)
        marks = _file_marks(path, a_text, b_text, named)
        rows.append(marks.row(path, "file", "", change, _digest(a), _digest(b)))
        if path == SIGNATURES:
            continue
        if posixpath.basename(path) in _JSON_FILES or path.endswith(".json"):
            pa, pb = _parsed_json(a), _parsed_json(b)
            if pa is not _MISSING and pb is not _MISSING:
                for parts, ch, va, vb in json_changes(pa, pb):
                    rows.append(marks.row(path, "value", pointer(parts), ch, va, vb))
                _check_size(rows)
                continue
        if a_text is None or b_text is None:
            continue  # binary: compared by digest only
        for ch, i, j, la, lb in line_changes(a_text.splitlines(), b_text.splitlines()):
            rows.append(marks.row(path, "line", "", ch, la, lb, i, j))
        _check_size(rows)
    return _finish("bundles", {"bundle_digest": old_digest}, {"bundle_digest": new_digest}, rows)


def line_changes(
    old: Sequence[str], new: Sequence[str]
) -> Iterator[tuple[Change, int | None, int | None, str | None, str | None]]:
    """(change, old line number, new line number, old text, new text) per changed line, in
    file order; a replaced block pairs its lines one to one."""
    matcher = difflib.SequenceMatcher(None, old, new)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for k in range(pairs):
            yield "changed", i1 + k + 1, j1 + k + 1, old[i1 + k], new[j1 + k]
        for i in range(i1 + pairs, i2):
            yield "removed", i + 1, None, old[i], None
        for j in range(j1 + pairs, j2):
            yield "added", None, j + 1, None, new[j]


def _check_size(rows: Sequence[Row]) -> None:
    if len(rows) > MAX_ROWS:
        raise DiffTooLarge(
            f"diff_too_large: the diff has more than {MAX_ROWS:,} rows; compare smaller inputs"
        )


def _finish(kind: Kind, old: dict[str, str], new: dict[str, str], rows: list[Row]) -> Diff:
    _check_size(rows)
    frozen = tuple(rows)
    return Diff(kind, old, new, frozen, diff_hash(kind, old, new, frozen))


# --- pages ---------------------------------------------------------------------------------------


def encode_cursor(hash_: str, offset: int) -> str:
    """An opaque cursor: the row to start from, bound to its diff."""
    raw = f"{hash_.removeprefix('sha256:')[:16]}.{offset}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(hash_: str, cursor: str | None, total: int) -> int:
    """The offset ``cursor`` names; ``diff_cursor_invalid`` if it is not one of this diff's."""
    if not cursor:
        return 0
    bad = InvalidInput(
        "diff_cursor_invalid: the cursor is not one this diff's pages gave; start again "
        "without a cursor"
    )
    if len(cursor) > 64:
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad from None
    prefix, _, number = text.partition(".")
    if prefix != hash_.removeprefix("sha256:")[:16] or not number.isdigit() or len(number) > 9:
        raise bad
    offset = int(number)
    if offset > total:
        raise bad
    return offset


def _cell(value: Any) -> tuple[Any, bool]:
    """``value``, or its size and sha256 when its JSON is over :data:`MAX_CELL_BYTES`."""
    if value is None or isinstance(value, bool | int | float):
        return value, False
    if isinstance(value, str) and len(value) <= MAX_CELL_BYTES // 4:
        return value, False
    encoded = _key(value)
    if len(encoded) <= MAX_CELL_BYTES:
        return value, False
    return {
        "$truncated": {"bytes": len(encoded), "sha256": hashlib.sha256(encoded).hexdigest()}
    }, True


def _side(row: Row, value: Any, line: int | None, present: bool) -> dict[str, Any] | None:
    if not present:
        return None
    text = value if row.kind != "value" else _key(value).decode()
    shown, cut = _cell(text)
    return {"line": line, "text": shown if not cut else None, "truncated": cut}


def render(row: Row, index: int, view: View) -> dict[str, Any]:
    """One row as a page shows it: ``structured`` (old and new values) or ``side-by-side``
    (``left`` and ``right`` cells with line numbers and text)."""
    base = {
        "index": index,
        "section": row.section,
        "kind": row.kind,
        "path": row.path,
        "change": row.change,
        "locked": row.locked,
        "enforced": row.enforced,
        "policies": list(row.policies),
        "notes": list(row.notes),
    }
    if view == "structured":
        old, cut_old = _cell(row.old)
        new, cut_new = _cell(row.new)
        return {
            **base,
            "old": old,
            "new": new,
            "old_line": row.old_line,
            "new_line": row.new_line,
            "truncated": cut_old or cut_new,
        }
    return {
        **base,
        "left": _side(row, row.old, row.old_line, row.change != "added"),
        "right": _side(row, row.new, row.new_line, row.change != "removed"),
    }


def page(diff: Diff, *, cursor: str | None, limit: int, view: View) -> dict[str, Any]:
    """Rows from ``cursor`` on: at most ``limit``, and no more than :data:`PAGE_BYTES`
    (at least one row); ``next_cursor`` is null on the last page."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"diff_limit_invalid: limit must be 1 to {MAX_LIMIT}, not {limit}")
    if view not in VIEWS:
        raise InvalidInput(f"diff_view_invalid: view is one of {', '.join(VIEWS)}")
    total = len(diff.rows)
    i = start = decode_cursor(diff.diff_hash, cursor, total)
    out: list[dict[str, Any]] = []
    size = 0
    while i < total and len(out) < limit:
        shown = render(diff.rows[i], i, view)
        size += len(orjson.dumps(shown))
        if out and size > PAGE_BYTES:
            break
        out.append(shown)
        i += 1
    return {
        "diff_hash": diff.diff_hash,
        "view": view,
        "offset": start,
        "total": total,
        "rows": out,
        "next_cursor": encode_cursor(diff.diff_hash, i) if i < total else None,
    }
