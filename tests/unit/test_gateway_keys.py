"""API key format, parsing, hashing and verification; tenant-creation decisions."""

from __future__ import annotations

import hashlib

import pytest

from libs.errors import InvalidInput, Unauthorized
from services.gateway.domain import (
    KEY_ID_LENGTH,
    decide_create_tenant,
    generate_key,
    hash_secret,
    parse_key,
    secret_matches,
)

pytestmark = pytest.mark.unit


def test_generated_key_has_the_documented_format() -> None:
    key = generate_key()
    prefix, key_id, secret = key.token.split("_", 2)
    assert prefix == "mc"
    assert key_id == key.key_id
    assert len(key_id) == KEY_ID_LENGTH
    assert set(key_id) <= set("abcdefghijklmnopqrstuvwxyz0123456789")
    # 32 random bytes in URL-safe base64, no padding.
    assert len(secret) >= 43


def test_generated_keys_are_unique() -> None:
    tokens = {generate_key().token for _ in range(200)}
    ids = {t.split("_")[1] for t in tokens}
    assert len(tokens) == 200
    assert len(ids) == 200


def test_parse_round_trips_even_when_the_secret_contains_underscores() -> None:
    # Secrets are URL-safe base64, whose alphabet includes '_': only two separators split.
    for _ in range(100):
        key = generate_key()
        parsed = parse_key(key.token)
        assert parsed.key_id == key.key_id
        assert hash_secret(parsed.secret) == key.secret_hash
    parsed = parse_key("mc_abcdefghij12_" + "x_y" * 20)
    assert parsed.key_id == "abcdefghij12"
    assert parsed.secret == "x_y" * 20


@pytest.mark.parametrize(
    "token",
    [
        "",
        "mc",
        "mc_abcdefghij12",
        "xx_abcdefghij12_" + "s" * 43,
        "mc_short_" + "s" * 43,
        "mc_ABCDEFGHIJ12_" + "s" * 43,
        "mc_abcdefghij1!_" + "s" * 43,
        "mc_abcdefghij12_tooshort",
        "mc_abcdefghij12_" + "s" * 500,
    ],
)
def test_malformed_keys_are_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized):
        parse_key(token)


def test_only_the_sha256_of_the_secret_is_kept() -> None:
    key = generate_key()
    secret = key.token.split("_", 2)[2]
    assert key.secret_hash == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in key.secret_hash


def test_secret_matches_only_the_right_secret() -> None:
    key = generate_key()
    secret = parse_key(key.token).secret
    assert secret_matches(secret, key.secret_hash)
    assert not secret_matches(secret + "x", key.secret_hash)
    assert not secret_matches(generate_key().token.split("_", 2)[2], key.secret_hash)
    # Stored hashes come back from PostgreSQL as memoryview.
    assert secret_matches(secret, memoryview(key.secret_hash))  # type: ignore[arg-type]


def test_tenant_created_event_defaults_its_name_to_the_id() -> None:
    event = decide_create_tenant("acme", None)
    assert (event.tenant_id, event.name) == ("acme", "acme")
    assert decide_create_tenant("acme", " Acme Inc ").name == "Acme Inc"


@pytest.mark.parametrize("tenant_id", ["", "Acme", "a.b", "a/b", "-x", "a" * 64, "a*"])
def test_invalid_tenant_ids_are_refused(tenant_id: str) -> None:
    with pytest.raises(InvalidInput):
        decide_create_tenant(tenant_id, None)


def test_overlong_tenant_name_is_refused() -> None:
    with pytest.raises(InvalidInput):
        decide_create_tenant("acme", "x" * 201)
