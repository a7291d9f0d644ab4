"""The checkpoint's Merkle root and signature, apart from any database."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from libs.errors import InvalidInput
from libs.eventbus.anchor import (
    HeadsAt,
    load_signing_key,
    merkle_leaf,
    merkle_root,
    sign_checkpoint,
    signature_problem,
)

pytestmark = pytest.mark.unit


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 computed bottom-up: pair neighbours, carry an odd last node up unchanged."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = leaves
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 31, 100])
def test_the_merkle_root_is_rfc_6962s(n: int) -> None:
    leaves = [merkle_leaf(f"t/run/{i}", i + 1, bytes([i % 256]) * 32) for i in range(n)]
    assert merkle_root(leaves) == _reference_root(leaves)


def test_the_root_changes_with_any_heads_version_hash_or_presence() -> None:
    heads = {f"t/run/{i}": (i + 1, bytes([i]) * 32) for i in range(5)}
    root = HeadsAt(10, heads).root()
    assert HeadsAt(10, dict(heads)).root() == root  # order of the dict does not matter
    for changed in (
        {**heads, "t/run/2": (2, heads["t/run/2"][1])},
        {**heads, "t/run/2": (3, b"\xff" * 32)},
        {k: v for k, v in heads.items() if k != "t/run/4"},
    ):
        assert HeadsAt(10, changed).root() != root


def test_a_signed_checkpoint_verifies_and_any_change_or_other_key_does_not() -> None:
    key = Ed25519PrivateKey.generate()
    event = sign_checkpoint(key, 3, HeadsAt(42, {"t/run/a": (2, b"\x01" * 32)}))
    payload = event.model_dump(mode="json")
    assert signature_problem(key.public_key(), payload) is None
    assert (payload["seq"], payload["streams"], payload["events"]) == (3, 1, 2)
    for field, value in (("events", 3), ("merkle_root", "0" * 64), ("horizon_xid", "43")):
        assert signature_problem(key.public_key(), {**payload, field: value}) is not None
    other = Ed25519PrivateKey.generate().public_key()
    problem = signature_problem(other, payload)
    assert problem is not None and "not the trusted key" in problem


def test_a_bad_signing_key_is_named_without_its_value() -> None:
    with pytest.raises(InvalidInput, match="MC_ANCHOR_SIGNING_KEY is not a PEM") as caught:
        load_signing_key(SecretStr("secret-not-a-key"))
    assert "secret-not-a-key" not in str(caught.value)
