"""Signed policy bundles: safe extraction, OPA-format signatures, signing.

Shared by policy-admission (which verifies what is uploaded) and ``mctl policy sign`` (which
signs a directory for people without OPA).

A bundle artifact is a gzipped tar in OPA's layout: a ``.manifest`` (JSON, with a ``revision``),
``data.json`` files (each one's directory is its place under ``data``), Rego modules
(``*.rego``; ``*_test.rego`` are the bundle's own tests) and a ``.signatures.json``. Anything
else (runbooks, READMEs) may ride along; every file but ``.signatures.json`` must be signed.

Its digest is ``sha256:<hex>`` of the archive's bytes: content-addressed, the name an
activation pins.

The signature is OPA's (``opa build --signing-key ... --signing-alg EdDSA`` makes one):
``.signatures.json`` is ``{"signatures": ["<JWT>"]}``, one compact JWS whose header names the
key (``kid``; else the payload's deprecated ``keyid``) and whose payload lists every file as
``{"name", "hash", "algorithm"}``. A file's hash is over its bytes, except for the structured
files (``data.json``, ``data.yaml``, ``.manifest``), hashed over their parsed JSON with object
keys sorted (OPA's ``bundle/hash.go``), so whitespace does not change it. Only ``EdDSA``
(ed25519) keys and ``SHA-256`` file hashes are accepted.

Every refusal is a :class:`BundleRejected` whose message starts with its reason
(``bundle_unsigned: ...``), so callers and tests can tell them apart.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from libs.contracts.policy import SIGNING_KEY_ID_PATTERN
from libs.errors import Conflict, InvalidInput, NotFound, PermanentError, TooLarge

MANIFEST = ".manifest"
SIGNATURES = ".signatures.json"
DATA_FILES = ("data.json",)
STRUCTURED = frozenset({"data.json", "data.yaml", "data.yml", MANIFEST, SIGNATURES})
SIGNING_ALG = "EdDSA"
HASH_ALG = "SHA-256"

MAX_ARCHIVE_BYTES = 512 * 1024
"""The compressed archive: it travels in one bus message (base64) and is stored whole."""
MAX_FILES = 256
MAX_FILE_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 4 * 1024 * 1024
"""All files uncompressed together: a gzip bomb stops here, not in memory."""
MAX_PATH = 255
MAX_REVISION = 64
REVISION_PATTERN = re.compile(r"^[0-9]{1,18}(\.[0-9]{1,18}){0,7}$")
_KEY_ID = re.compile(SIGNING_KEY_ID_PATTERN)


class _Named(Exception):
    """An error whose message starts with its reason word (``reason: detail``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BundleRejected(_Named, InvalidInput):
    """A bundle refused for ``reason`` (the first word of the message); 422."""


class BundleTooLarge(_Named, TooLarge):
    """The archive, a file, or all files together are over their bound; 413."""


class BundleConflict(_Named, Conflict):
    """An activation that would go backwards, or a key id reused; 409."""


class BundleNotFound(_Named, NotFound):
    """No uploaded bundle of this tenant has the digest; 404."""


def reason_of(exc: PermanentError) -> str:
    """The reason word an error's message starts with."""
    return str(exc).split(":", 1)[0]


def archive_digest(archive: bytes) -> str:
    """``sha256:<hex>`` of the archive's bytes."""
    return f"sha256:{hashlib.sha256(archive).hexdigest()}"


# --- extraction ----------------------------------------------------------------------------------


def _safe_name(raw: str) -> str:
    """The member's path, normalised, or a refusal: absolute, ``..``, empty, or too long."""
    if "\x00" in raw or "\\" in raw:
        raise BundleRejected("bundle_unsafe_path", f"member name {raw[:80]!r} is not a POSIX path")
    if raw.startswith("/"):
        raise BundleRejected("bundle_unsafe_path", f"member {raw[:80]!r} has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleRejected("bundle_unsafe_path", f"member {raw[:80]!r} climbs out with '..'")
    name = "/".join(parts)
    if not name or len(name) > MAX_PATH:
        raise BundleRejected("bundle_unsafe_path", f"member name {raw[:80]!r} is empty or too long")
    return name


MAX_TAR_BYTES = MAX_TOTAL_BYTES + (MAX_FILES + 64) * 3 * 512 + 64 * 1024
"""The uncompressed tar: the files plus a few header blocks each. Decompressing stops here, so
no header (a long name, a PAX record) can make a small archive expand without bound."""


def _gunzip(archive: bytes) -> bytes:
    """The archive decompressed, at most :data:`MAX_TAR_BYTES`."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(archive, MAX_TAR_BYTES + 1)
    except zlib.error as exc:
        raise BundleRejected("bundle_malformed", f"not a readable tar.gz: {exc}") from None
    if len(out) > MAX_TAR_BYTES:
        raise BundleTooLarge(
            "bundle_file_too_large",
            f"the archive expands to more than {MAX_TAR_BYTES:,} bytes",
        )
    if not inflate.eof:
        raise BundleRejected("bundle_malformed", "the gzip stream is truncated")
    return out


def extract(archive: bytes) -> dict[str, bytes]:
    """The regular files of a gzipped tar, by normalised path, read within every bound.

    Refused: over :data:`MAX_ARCHIVE_BYTES` (413 ``bundle_too_large``), not a gzipped tar
    (``bundle_malformed``), absolute or ``..`` paths (``bundle_unsafe_path``), symbolic or hard
    links (``bundle_link``), devices, FIFOs and other special members (``bundle_special_file``),
    more than :data:`MAX_FILES` files (``bundle_too_many_files``), a file over
    :data:`MAX_FILE_BYTES` or all over :data:`MAX_TOTAL_BYTES` (413 ``bundle_file_too_large``),
    the same path twice (``bundle_duplicate_file``). Nothing is written to disk.
    """
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise BundleTooLarge(
            "bundle_too_large",
            f"the archive is {len(archive):,} bytes, over the {MAX_ARCHIVE_BYTES:,} bytes allowed",
        )
    if archive[:2] != b"\x1f\x8b":
        raise BundleRejected("bundle_malformed", "the body is not a gzip-compressed tar archive")
    files: dict[str, bytes] = {}
    total = 0
    tar_bytes = _gunzip(archive)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    _safe_name(member.name)
                    continue
                if member.issym() or member.islnk():
                    raise BundleRejected(
                        "bundle_link", f"member {member.name[:80]!r} is a link; links are refused"
                    )
                if not member.isfile():
                    raise BundleRejected(
                        "bundle_special_file",
                        f"member {member.name[:80]!r} is a device, FIFO or other special file",
                    )
                name = _safe_name(member.name)
                if len(files) >= MAX_FILES:
                    raise BundleRejected(
                        "bundle_too_many_files", f"more than {MAX_FILES} files in the bundle"
                    )
                if member.size > MAX_FILE_BYTES:
                    raise BundleTooLarge(
                        "bundle_file_too_large",
                        f"{name!r} is {member.size:,} bytes, over {MAX_FILE_BYTES:,}",
                    )
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise BundleTooLarge(
                        "bundle_file_too_large",
                        f"the files add up to more than {MAX_TOTAL_BYTES:,} bytes",
                    )
                if name in files:
                    raise BundleRejected("bundle_duplicate_file", f"{name!r} appears twice")
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - regular files always have data
                    raise BundleRejected("bundle_malformed", f"{name!r} has no data")
                data = handle.read(MAX_FILE_BYTES + 1)
                if len(data) != member.size:
                    raise BundleRejected("bundle_malformed", f"{name!r} is truncated")
                files[name] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleRejected("bundle_malformed", f"not a readable tar.gz: {exc}") from None
    if not files:
        raise BundleRejected("bundle_malformed", "the archive holds no files")
    return files


def pack(files: Mapping[str, bytes]) -> bytes:
    """A gzipped tar of ``files`` (sorted, fixed times and owners: the same files always make
    the same bytes, hence the same digest)."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


# --- OPA's file hashes ---------------------------------------------------------------------------


class _Number(str):
    """A JSON number kept as its literal text (OPA hashes numbers as written)."""


def _go_json(value: Any) -> str:
    """One primitive encoded as Go's ``encoding/json`` does with HTML escaping off."""
    if isinstance(value, _Number):
        return str(value)
    text = json.dumps(value, ensure_ascii=False)
    # Go escapes the two JavaScript line terminators; Python leaves them as they are.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _walk(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_go_json(key))
            out.append(":")
            _walk(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _walk(item, out)
        out.append("]")
    else:
        out.append(_go_json(value))


def _json(data: bytes, name: str, reason: str) -> Any:
    """``data`` as JSON; ``reason`` naming the file if it is not."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleRejected(reason, f"{name!r} is not valid JSON: {exc}") from None


def parse_json(data: bytes, name: str) -> Any:
    """``data`` as JSON with numbers kept as written; ``bundle_malformed`` if it is not."""
    try:
        return json.loads(data.decode("utf-8"), parse_int=_Number, parse_float=_Number)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleRejected("bundle_malformed", f"{name!r} is not valid JSON: {exc}") from None


def file_hash(name: str, data: bytes) -> str:
    """The hex SHA-256 OPA signs for one file: over the bytes, or over the sorted JSON of a
    structured file."""
    if posixpath.basename(name) in STRUCTURED:
        out: list[str] = []
        _walk(parse_json(data, name), out)
        data = "".join(out).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# --- signatures ----------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_public_key(pem: str) -> Ed25519PublicKey:
    """An ed25519 public key from PEM; ``invalid_key`` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BundleRejected("invalid_key", f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleRejected("invalid_key", "only ed25519 (EdDSA) public keys are accepted")
    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An ed25519 private key from (unencrypted) PEM; ``invalid_key`` otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleRejected("invalid_key", f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleRejected("invalid_key", "only ed25519 (EdDSA) private keys are accepted")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public half as SubjectPublicKeyInfo PEM."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_fingerprint(pem: str) -> str:
    """``sha256:<hex>`` of the raw public key: how a key is named whatever its PEM spacing."""
    raw = load_public_key(pem).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def sign_files(files: Mapping[str, bytes], key: Ed25519PrivateKey, key_id: str) -> bytes:
    """The ``.signatures.json`` for ``files``, as ``opa build --signing-alg EdDSA`` writes it:
    header ``{"alg", "kid"}``, payload ``{"files": [...], "keyid"}`` (keys sorted, as Go
    marshals a map)."""
    if not _KEY_ID.match(key_id):
        raise BundleRejected(
            "invalid_key", f"key id {key_id!r} does not match {SIGNING_KEY_ID_PATTERN}"
        )
    entries = [
        {"name": name, "hash": file_hash(name, data), "algorithm": HASH_ALG}
        for name, data in sorted(files.items())
        if name != SIGNATURES
    ]
    header = {"alg": SIGNING_ALG, "kid": key_id}
    payload = {"files": entries, "keyid": key_id}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":"), sort_keys=True).encode())
        for part in (header, payload)
    )
    signature = key.sign(signing_input.encode("ascii"))
    token = f"{signing_input}.{_b64url(signature)}"
    return json.dumps({"signatures": [token]}).encode()


@dataclass(frozen=True)
class SignedBy:
    """Who signed a bundle: the key id the JWT names, and what the JWT lists."""

    key_id: str
    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    """name → (algorithm, hex hash)."""


def read_signature(files: Mapping[str, bytes]) -> tuple[str, SignedBy]:
    """The one JWT of ``.signatures.json`` and its (unverified) key id and file list.

    ``bundle_unsigned`` without the file or a JWT; ``bundle_signature_invalid`` when it cannot
    be read.
    """
    raw = files.get(SIGNATURES)
    if raw is None:
        raise BundleRejected("bundle_unsigned", f"the bundle has no {SIGNATURES}")
    doc = _json(raw, SIGNATURES, "bundle_signature_invalid")
    tokens = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(tokens, list) or not tokens:
        raise BundleRejected("bundle_unsigned", f"{SIGNATURES} holds no signature")
    if len(tokens) > 1 or not isinstance(tokens[0], str):
        raise BundleRejected("bundle_signature_invalid", "expected exactly one JWT")
    token = tokens[0]
    try:
        header_b64, payload_b64, _ = token.split(".")
        header = json.loads(_unb64url(header_b64))
        payload = json.loads(_unb64url(payload_b64))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise BundleRejected("bundle_signature_invalid", f"the JWT is malformed: {exc}") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise BundleRejected("bundle_signature_invalid", "the JWT's parts are not JSON objects")
    key_id = header.get("kid") or payload.get("keyid")
    if not isinstance(key_id, str) or not key_id:
        raise BundleRejected("bundle_signature_invalid", "the JWT names no key (kid or keyid)")
    listed: dict[str, tuple[str, str]] = {}
    entries = payload.get("files")
    if not isinstance(entries, list):
        raise BundleRejected("bundle_signature_invalid", "the JWT payload lists no files")
    for entry in entries:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("name", "hash", "algorithm")
        ):
            raise BundleRejected("bundle_signature_invalid", f"malformed file entry {entry!r}")
        listed[entry["name"].lstrip("/")] = (entry["algorithm"], entry["hash"].lower())
    if header.get("alg") != SIGNING_ALG:
        raise BundleRejected(
            "bundle_signature_invalid",
            f"signing algorithm {header.get('alg')!r} is not accepted (only {SIGNING_ALG})",
        )
    if payload.get("scope") not in (None, ""):
        raise BundleRejected("bundle_signature_invalid", "signature scopes are not supported")
    return token, SignedBy(key_id=key_id, files=listed)


def verify(files: Mapping[str, bytes], public_keys: Mapping[str, str]) -> SignedBy:
    """Check the bundle's signature against the tenant's active keys (key id → PEM).

    Refused, in this order: ``bundle_unsigned``; ``bundle_signature_invalid`` (unreadable, wrong
    algorithm, bad signature); ``bundle_key_unknown`` (the key id is not one of ``public_keys``,
    which holds only active keys: a retired key is unknown here); ``bundle_file_unsigned`` (a
    file the signature does not list); ``bundle_file_missing`` (a listed file that is absent);
    ``bundle_file_tampered`` (a file whose hash differs).
    """
    token, signed = read_signature(files)
    pem = public_keys.get(signed.key_id)
    if pem is None:
        raise BundleRejected(
            "bundle_key_unknown",
            f"key {signed.key_id!r} is not an active signing key of this tenant",
        )
    signing_input, _, sig_b64 = token.rpartition(".")
    try:
        load_public_key(pem).verify(_unb64url(sig_b64), signing_input.encode("ascii"))
    except (InvalidSignature, ValueError, binascii.Error):
        raise BundleRejected(
            "bundle_signature_invalid", f"the signature does not verify with key {signed.key_id!r}"
        ) from None
    present = {name for name in files if name != SIGNATURES}
    extra = sorted(present - signed.files.keys())
    if extra:
        raise BundleRejected(
            "bundle_file_unsigned", f"files not included in the signature: {', '.join(extra)}"
        )
    missing = sorted(signed.files.keys() - present)
    if missing:
        raise BundleRejected(
            "bundle_file_missing", f"signed files absent from the bundle: {', '.join(missing)}"
        )
    for name in sorted(present):
        algorithm, expected = signed.files[name]
        if algorithm != HASH_ALG:
            raise BundleRejected(
                "bundle_signature_invalid", f"{name}: hash algorithm {algorithm!r} not accepted"
            )
        if file_hash(name, files[name]) != expected:
            raise BundleRejected("bundle_file_tampered", f"{name}: digest mismatch")
    return signed


def signed_archive(files: Mapping[str, bytes], key: Ed25519PrivateKey, key_id: str) -> bytes:
    """``files`` plus their ``.signatures.json``, packed: what ``mctl policy sign`` writes."""
    unsigned = {name: data for name, data in files.items() if name != SIGNATURES}
    return pack({**unsigned, SIGNATURES: sign_files(unsigned, key, key_id)})


def directory_files(root: Path, revision: str | None = None) -> dict[str, bytes]:
    """The regular files under ``root`` (links and special files refused, as in an upload),
    without an old ``.signatures.json``; with ``revision`` the ``.manifest`` gets it."""
    if not root.is_dir():
        raise BundleRejected("bundle_malformed", f"{str(root)!r} is not a directory")
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleRejected("bundle_link", f"{rel!r} is a link; links are refused")
        if path.is_dir():
            continue
        if not path.is_file():
            raise BundleRejected("bundle_special_file", f"{rel!r} is not a regular file")
        if rel != SIGNATURES:
            files[rel] = path.read_bytes()
    if revision is not None:
        manifest: dict[str, Any] = {}
        if MANIFEST in files:
            loaded = json.loads(files[MANIFEST].decode("utf-8"))
            manifest = loaded if isinstance(loaded, dict) else {}
        manifest["revision"] = revision
        files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    return files


def sign_directory(
    root: Path, private_key_pem: bytes, key_id: str, output: Path, *, revision: str | None = None
) -> str:
    """Sign the bundle under ``root`` and write it to ``output``; its digest.

    The ``.manifest`` must carry an ordered ``revision`` (or give ``revision``).
    """
    files = directory_files(root, revision=revision)
    manifest_revision(files)
    archive = signed_archive(files, load_private_key(private_key_pem), key_id)
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise BundleTooLarge(
            "bundle_too_large",
            f"the archive is {len(archive):,} bytes, over the {MAX_ARCHIVE_BYTES:,} bytes allowed",
        )
    extract(archive)  # the bounds an upload will check
    output.write_bytes(archive)
    return archive_digest(archive)


# --- the manifest and the content ----------------------------------------------------------------


def revision_key(revision: str) -> tuple[int, ...]:
    """The order of revisions: dot-separated integers compared component by component
    (``2 < 10``, ``1.9 < 1.10``, ``1 < 1.0``)."""
    return tuple(int(p) for p in revision.split("."))


def manifest_revision(files: Mapping[str, bytes]) -> str:
    """The ``revision`` of ``.manifest``; ``bundle_manifest_invalid`` if absent or unordered."""
    raw = files.get(MANIFEST)
    if raw is None:
        raise BundleRejected("bundle_manifest_invalid", f"the bundle has no {MANIFEST}")
    manifest = _json(raw, MANIFEST, "bundle_manifest_invalid")
    revision = manifest.get("revision") if isinstance(manifest, dict) else None
    if not isinstance(revision, str) or not REVISION_PATTERN.match(revision):
        raise BundleRejected(
            "bundle_manifest_invalid",
            f"{MANIFEST} must have a 'revision' of dot-separated integers (like '42' or "
            f"'2026.11.30.1'), got {revision!r}",
        )
    return revision


def _set_path(doc: dict[str, Any], path: list[str], value: Any, name: str) -> None:
    node = doc
    for part in path:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise BundleRejected("bundle_malformed", f"{name!r} overlaps other data")
        node = nxt
    if not isinstance(value, dict):
        raise BundleRejected("bundle_malformed", f"{name!r} must hold a JSON object")
    for key, item in value.items():
        if key in node:
            raise BundleRejected("bundle_malformed", f"{name!r}: key {key!r} is defined twice")
        node[key] = item


def content_of(files: Mapping[str, bytes]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(modules, tests)``: the policy modules and the ``*_test.rego`` modules as (path,
    source), plus every ``data.json`` merged into one ``data.json`` entry at the end of
    ``modules`` (a file's directory is its path under ``data``)."""
    modules: list[tuple[str, str]] = []
    tests: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    for name in sorted(files):
        base = posixpath.basename(name)
        if name.endswith(".rego"):
            try:
                source = files[name].decode("utf-8")
            except UnicodeDecodeError:
                raise BundleRejected("bundle_malformed", f"{name!r} is not UTF-8") from None
            (tests if base.endswith("_test.rego") else modules).append((name, source))
        elif base in DATA_FILES:
            value = _json(files[name], name, "bundle_malformed")
            directory = posixpath.dirname(name)
            _set_path(data, directory.split("/") if directory else [], value, name)
    if not modules:
        raise BundleRejected("bundle_compile_failed", "the bundle has no policy modules")
    modules.append(("data.json", json.dumps(data, separators=(",", ":"), sort_keys=True)))
    return modules, tests
