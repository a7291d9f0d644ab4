"""Evidence signatures: what docs/evidence.md tells an auditor to check holds, and every kind of
tampering is named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import orjson
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs.eventbus.anchor import HeadsAt, sign_checkpoint
from libs.evidence_signing import SIG_SUFFIX, sign_statement, signed_json, verify_file

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
ANCHOR = Ed25519PrivateKey.generate()
CHECKPOINT = {
    **sign_checkpoint(
        ANCHOR, 3, HeadsAt(horizon=7, heads={"t/run/r": (2, b"\x01" * 32)})
    ).model_dump(mode="json"),
    "event_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "position": 41,
}
META = {"document": "soc2-evidence", "format": "pdf", "tenant_id": "acme", "checkpoint": CHECKPOINT}


def write(tmp: Path, body: bytes) -> Path:
    path = tmp / "evidence.pdf"
    path.write_bytes(body)
    path.with_name(path.name + SIG_SUFFIX).write_bytes(
        orjson.dumps(sign_statement(KEY, body, META))
    )
    return path


def test_the_documented_check_holds_with_python_and_cryptography_only(tmp_path: Path) -> None:
    path = write(tmp_path, b"%PDF-1.4 evidence")
    statement = json.loads(path.with_name(path.name + SIG_SUFFIX).read_text())
    body = path.read_bytes()
    assert statement["sha256"] == "sha256:" + hashlib.sha256(body).hexdigest()
    unsigned = {k: v for k, v in statement.items() if k != "signature"}
    KEY.public_key().verify(bytes.fromhex(statement["signature"]), rfc8785.dumps(unsigned))


def test_a_file_that_holds_verifies_with_its_keys(tmp_path: Path) -> None:
    path = write(tmp_path, b"%PDF-1.4 evidence")
    statement, problems = verify_file(
        path, trusted=KEY.public_key(), anchor_key=ANCHOR.public_key()
    )
    assert problems == [] and statement["checkpoint"]["seq"] == 3


def test_every_tampering_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, b"%PDF-1.4 evidence")
    path.write_bytes(b"%PDF-1.4 evidencE")
    assert any("the file was modified" in p for p in verify_file(path)[1])

    path = write(tmp_path, b"%PDF-1.4 evidence")
    sig = path.with_name(path.name + SIG_SUFFIX)
    forged = {**orjson.loads(sig.read_bytes()), "tenant_id": "other"}
    sig.write_bytes(orjson.dumps(forged))
    assert any("does not match the statement" in p for p in verify_file(path)[1])

    path = write(tmp_path, b"%PDF-1.4 evidence")
    other = Ed25519PrivateKey.generate().public_key()
    assert any("not the trusted key" in p for p in verify_file(path, trusted=other)[1])
    assert any("checkpoint 3" in p for p in verify_file(path, anchor_key=other)[1])

    sig.unlink()
    assert "does not exist" in verify_file(path)[1][0]


def test_a_json_document_carries_its_signature(tmp_path: Path) -> None:
    path = tmp_path / "evidence.json"
    path.write_bytes(signed_json(KEY, {"figures": [1, 2]}, META))
    assert verify_file(path, trusted=KEY.public_key())[1] == []
    doc = orjson.loads(path.read_bytes())
    doc["evidence"]["figures"][0] = 3
    path.write_bytes(orjson.dumps(doc))
    assert any("modified" in p for p in verify_file(path)[1])
