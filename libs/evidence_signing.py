"""Signatures of evidence documents (SOC2 evidence, debriefs, attestations), verifiable offline.

A document is signed by a **statement**: what it is (``document``, ``format``, tenant, period,
when it was generated and up to which store position it read), the sha256 of its bytes, the
newest signed checkpoint of the event store when it was taken (``anchor.checkpointed``, see
:mod:`libs.eventbus.anchor`), and an ed25519 signature over the RFC 8785 JSON of all of that
(``signature`` left out), by the key ``key_id`` names (its raw public key in ``public_key``).

* A JSON document is ``{"evidence": <document>, "signature": <statement>}``; the statement's
  ``sha256`` is that of the RFC 8785 JSON of ``evidence``.
* Any other file (PDF, CSV, Markdown, HTML) has its statement beside it in ``FILE.sig`` (the
  HTTP API returns it in the ``X-Evidence-Signature`` header, base64 of its JSON).

The signing key is the audit service's (``MC_EVIDENCE_SIGNING_KEY``, else
``<data dir>/evidence/signing.key``, generated on first use); ``<data dir>/evidence/signing.pub``
is the public key an auditor trusts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import SecretStr

from libs.contracts.canonical import canonical_json
from libs.errors import InvalidInput
from libs.eventbus.anchor import ensure_key_files, key_id, signature_problem, signed_message

KEY_DIR = "evidence"
ALGORITHM = "ed25519"
SIG_SUFFIX = ".sig"


def sha256_hex(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _raw(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_statement(key: Ed25519PrivateKey, body: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """The signed statement of a file's ``body``, with ``meta`` (document, format, tenant, ...)."""
    statement = {
        **meta,
        "sha256": sha256_hex(body),
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "public_key": _raw(key.public_key()),
    }
    return {**statement, "signature": key.sign(signed_message(statement)).hex()}


def signed_json(key: Ed25519PrivateKey, doc: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """``doc`` as the signed JSON file ``{"evidence", "signature"}`` (indented)."""
    statement = sign_statement(key, canonical_json(doc), meta)
    return orjson.dumps({"evidence": doc, "signature": statement}, option=orjson.OPT_INDENT_2)


def statement_problems(
    statement: dict[str, Any],
    body: bytes,
    *,
    trusted: Ed25519PublicKey | None = None,
    anchor_key: Ed25519PublicKey | None = None,
) -> list[str]:
    """Why ``statement`` does not prove ``body`` (empty when it does).

    The signature is checked with the statement's own public key, which must be ``trusted``'s
    when given; the checkpoint's signature with ``anchor_key`` when given.
    """
    problems = []
    if statement.get("sha256") != sha256_hex(body):
        problems.append(
            f"the file's sha256 {sha256_hex(body)} is not the signed {statement.get('sha256')!r}"
            " (the file was modified)"
        )
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(statement["public_key"])))
    except (KeyError, ValueError):
        return [*problems, "the signature statement has no valid public_key"]
    if trusted is not None and _raw(trusted) != _raw(public):
        problems.append(
            f"signed by key {statement.get('key_id')!r}, not the trusted key {key_id(trusted)!r}"
        )
    if statement.get("key_id") != key_id(public):
        problems.append("key_id does not name the statement's public key")
    try:
        public.verify(bytes.fromhex(str(statement.get("signature", ""))), signed_message(statement))
    except (InvalidSignature, ValueError):
        problems.append("the signature does not match the statement (forged or modified)")
    checkpoint = statement.get("checkpoint")
    if anchor_key is not None:
        if not isinstance(checkpoint, dict):
            problems.append("the statement names no signed checkpoint")
        else:
            payload = {k: v for k, v in checkpoint.items() if k not in ("event_id", "position")}
            problem = signature_problem(anchor_key, payload)
            if problem is not None:
                problems.append(f"checkpoint {checkpoint.get('seq')}: {problem}")
    return problems


def verify_file(
    path: Path,
    *,
    trusted: Ed25519PublicKey | None = None,
    anchor_key: Ed25519PublicKey | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The statement of the evidence file at ``path`` and the problems found (none: it holds).

    A signed JSON file carries its statement; any other file's is in ``path.sig``.
    """
    data = path.read_bytes()
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and set(parsed) == {"evidence", "signature"}:
        statement, body = parsed["signature"], canonical_json(parsed["evidence"])
    else:
        sig = path.with_name(path.name + SIG_SUFFIX)
        if not sig.exists():
            return {}, [f"{path} carries no signature and {sig} does not exist"]
        try:
            statement = orjson.loads(sig.read_bytes())
        except orjson.JSONDecodeError:
            return {}, [f"{sig} is not JSON"]
        body = data
    if not isinstance(statement, dict):
        return {}, ["the signature statement is not a JSON object"]
    return statement, statement_problems(statement, body, trusted=trusted, anchor_key=anchor_key)


def evidence_signing_key(pem: SecretStr | None, data_dir: Path) -> Ed25519PrivateKey:
    """The key evidence is signed with: ``pem`` (``MC_EVIDENCE_SIGNING_KEY``) when set, else
    ``<data_dir>/evidence/signing.key`` (generated when absent). Errors never quote the key."""
    if pem is None:
        private, _ = ensure_key_files(data_dir, KEY_DIR)
        pem = SecretStr(private.read_text())
    try:
        key = serialization.load_pem_private_key(pem.get_secret_value().encode(), password=None)
    except (ValueError, TypeError):
        raise InvalidInput("MC_EVIDENCE_SIGNING_KEY is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput("MC_EVIDENCE_SIGNING_KEY is not an ed25519 key")
    return key
