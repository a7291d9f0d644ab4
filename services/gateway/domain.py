"""Pure rules of the gateway: API key format, hashing and verification, tenant creation.

An API key is ``mc_<key_id>_<secret>``: ``key_id`` (12 characters of ``[a-z0-9]``) names the row in
``gateway.api_keys`` and may be logged; ``secret`` (32 random bytes, URL-safe base64) is shown once
and only its SHA-256 is stored. The secret has 256 bits of entropy, so a slow password hash would
add latency to every request without adding any protection against guessing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import TypeAdapter, ValidationError

from libs.contracts.envelope import TenantId
from libs.contracts.events import TenantCreated
from libs.errors import InvalidInput, Unauthorized

KEY_PREFIX = "mc"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
# token_urlsafe(32) is 43 characters; anything much shorter was not issued by us.
_MIN_SECRET_LENGTH = 43
_MAX_KEY_LENGTH = 200

_tenant_id = TypeAdapter(TenantId)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly generated key: ``token`` goes to the user once, ``secret_hash`` to the table."""

    key_id: str
    token: str
    secret_hash: bytes


@dataclass(frozen=True)
class ParsedKey:
    """The two parts of a presented key."""

    key_id: str
    secret: str


def generate_key() -> IssuedKey:
    """A new random API key."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return IssuedKey(
        key_id=key_id, token=f"{KEY_PREFIX}_{key_id}_{secret}", secret_hash=hash_secret(secret)
    )


def parse_key(token: str) -> ParsedKey:
    """Split a presented key into id and secret; :class:`Unauthorized` when it is not one of ours.

    The secret's alphabet includes ``_``, so only the first two separators split.
    """
    if len(token) > _MAX_KEY_LENGTH:
        raise Unauthorized("malformed API key")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise Unauthorized("malformed API key")
    key_id, secret = parts[1], parts[2]
    if len(key_id) != KEY_ID_LENGTH or any(c not in _KEY_ID_ALPHABET for c in key_id):
        raise Unauthorized("malformed API key")
    if len(secret) < _MIN_SECRET_LENGTH:
        raise Unauthorized("malformed API key")
    return ParsedKey(key_id=key_id, secret=secret)


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret, the only form in which it is stored."""
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    """Whether ``secret`` hashes to ``stored_hash`` (constant-time comparison)."""
    return hmac.compare_digest(hash_secret(secret), bytes(stored_hash))


# Passwords of the embedded identity provider's users: argon2id with the library's defaults
# (RFC 9106's second recommendation), which cost tens of milliseconds per guess.
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
_passwords = PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (salted), after checking its length."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidInput(
            f"a password is {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )
    return _passwords.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    """Whether ``password`` is the one ``stored_hash`` was made from."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _passwords.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# Stream ids start with the tenant; these name the system's own streams (the policy bundle).
RESERVED_TENANT_IDS = frozenset({"system"})


def check_tenant_id(tenant_id: str) -> str:
    """``tenant_id`` if it is a valid tenant id, else :class:`InvalidInput` saying why."""
    try:
        valid = _tenant_id.validate_python(tenant_id)
    except ValidationError as exc:
        raise InvalidInput(f"invalid tenant id {tenant_id!r}: {exc.errors()[0]['msg']}") from None
    if valid in RESERVED_TENANT_IDS:
        raise InvalidInput(f"tenant id {tenant_id!r} is reserved for the system's own streams")
    return valid


def decide_create_tenant(tenant_id: str, name: str | None) -> TenantCreated:
    """The event recording a new tenant (the display name defaults to the id)."""
    tenant_id = check_tenant_id(tenant_id)
    display = (name or tenant_id).strip()
    if not display or len(display) > 200:
        raise InvalidInput("tenant name must be 1-200 characters")
    return TenantCreated(tenant_id=tenant_id, name=display)
