"""People's bearer tokens: the ones the gateway issues and an external OIDC provider's.

Both are JWTs checked by one :class:`TokenVerifier` against a JWKS: the gateway's own key set
(served at :data:`JWKS_PATH`) and, when configured, the provider's (``MC_OIDC_JWKS_URL`` or
``MC_OIDC_JWKS_FILE``). A token is accepted only when its issuer is one of those two, its
audience is that issuer's, its algorithm is an asymmetric one of :data:`ACCEPTED_ALGORITHMS` (never
``none``, never HMAC: a public key must not double as a shared secret), its ``kid`` names a key of
that issuer's set, its signature holds, and it has not expired.

The gateway signs with an Ed25519 key generated at first start and kept, mode 0600, in the data
directory; every gateway process of one data directory shares it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from libs.contracts import new_uuid7
from libs.errors import InvalidInput, TransientError, Unauthorized
from libs.settings import Settings
from services.gateway.rbac import check_user_id, grants_from_claim

OWN_ISSUER = "mission-control"
OWN_AUDIENCE = "mission-control"
OWN_ALGORITHM = "EdDSA"
ROLES_CLAIM = "mc_roles"
JWKS_PATH = "/.well-known/jwks.json"
ACCEPTED_ALGORITHMS = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
LEEWAY_S = 10
KEY_FILE = Path("gateway") / "auth-signing-key.pem"
_MAX_TOKEN_LENGTH = 16_384


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """The gateway's Ed25519 token signing key and its public JWKS entry."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        # RFC 7638 thumbprint: the required members in lexicographic order, no white space.
        required = {k: jwk[k] for k in ("crv", "kty", "x")}
        canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
        self.kid = _b64url(hashlib.sha256(canonical).digest())
        self.public_jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": OWN_ALGORITHM}

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key in ``path``; generated there first (mode 0600) when the file does not exist.

        Creation is atomic: the key is written to a private temporary file and linked into place,
        so of two processes starting together one wins and both load its key.
        """
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        # Group read is allowed for a Kubernetes Secret mounted with fsGroup (mode 0440).
        if path.stat().st_mode & 0o037:
            raise InvalidInput(f"the token signing key {path} is open to other users: chmod 600 it")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise InvalidInput(f"the token signing key {path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidInput(f"the token signing key {path} is not an Ed25519 private key")
        return cls(key)

    def jwks(self) -> dict[str, Any]:
        """The public key set that verifies this key's tokens."""
        return {"keys": [self.public_jwk]}

    def issue(
        self,
        user_id: str,
        grants: Mapping[str, frozenset[str]],
        ttl_s: int,
        now: float | None = None,
    ) -> str:
        """A signed token naming ``user_id`` and, for information, the roles held at issue.

        The gateway does not authorize its own tokens from that claim: it reads the user's
        current grants (so a revoked role stops at once), see ``services/gateway/auth.py``.
        """
        issued_at = int(now if now is not None else time.time())
        claims = {
            "iss": OWN_ISSUER,
            "aud": OWN_AUDIENCE,
            "sub": user_id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + ttl_s,
            "jti": str(new_uuid7()),
            ROLES_CLAIM: {t: sorted(r) for t, r in sorted(grants.items()) if r},
        }
        return jwt.encode(claims, self.private, algorithm=OWN_ALGORITHM, headers={"kid": self.kid})


class KeySet(Protocol):
    """Where an issuer's public keys come from."""

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named ``kid``; :class:`Unauthorized` when the set has none of that name."""
        ...


class StaticKeySet:
    """A JWKS given whole: the gateway's own, or a provider's from a file."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            keys = jwt.PyJWKSet.from_dict(dict(jwks)).keys
        except jwt.PyJWTError as exc:
            raise InvalidInput(f"invalid JWKS: {exc}") from None
        self._keys = {k.key_id: k for k in keys if k.key_id}

    @classmethod
    def from_file(cls, path: Path) -> StaticKeySet:
        """The JWKS in the JSON file ``path``."""
        try:
            return cls(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read the JWKS file {path}: {exc}") from None

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named ``kid``."""
        found = self._keys.get(kid)
        if found is None:
            raise Unauthorized("the token's signing key (kid) is unknown")
        return found


class RemoteKeySet:
    """A provider's JWKS fetched from its URL, cached, and fetched again for an unknown ``kid``
    (at most once per :data:`REFETCH_INTERVAL_S`, so made-up kids cannot flood the provider)."""

    REFETCH_INTERVAL_S = 30.0

    def __init__(self, url: str) -> None:
        self._client = jwt.PyJWKClient(url, cache_keys=False, cache_jwk_set=False, timeout=5)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named ``kid``."""
        if kid not in self._keys:
            async with self._lock:
                if kid not in self._keys and self._due():
                    self._fetched_at = time.monotonic()
                    try:
                        keys = await asyncio.to_thread(self._client.get_signing_keys)
                    except jwt.PyJWKClientConnectionError:
                        raise TransientError(
                            "the identity provider's signing keys cannot be fetched"
                        ) from None
                    except jwt.PyJWKClientError as exc:
                        raise TransientError(f"the identity provider's JWKS: {exc}") from None
                    self._keys = {k.key_id: k for k in keys if k.key_id}
        found = self._keys.get(kid)
        if found is None:
            raise Unauthorized("the token's signing key (kid) is unknown")
        return found

    def _due(self) -> bool:
        return time.monotonic() - self._fetched_at >= self.REFETCH_INTERVAL_S


@dataclass(frozen=True)
class Issuer:
    """An issuer whose tokens are accepted: its audience, keys and where its roles come from."""

    name: str
    audience: str
    keys: KeySet
    own: bool
    roles_claim: str = ROLES_CLAIM


@dataclass(frozen=True)
class Verified:
    """What a valid token says: who, and (from an external provider) their roles per tenant.

    ``grants`` is ``None`` for the gateway's own tokens: their user's current grants decide.
    """

    user_id: str
    issuer: str
    grants: Mapping[str, frozenset[str]] | None


class TokenVerifier:
    """Validates bearer tokens of the issuers it trusts."""

    def __init__(self, issuers: list[Issuer]) -> None:
        self.issuers = {i.name: i for i in issuers}

    async def verify(self, token: str) -> Verified:
        """The identity ``token`` proves, or :class:`Unauthorized` saying what is wrong."""
        if len(token) > _MAX_TOKEN_LENGTH:
            raise Unauthorized("malformed bearer token")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("malformed bearer token") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise Unauthorized(f"token algorithm {str(alg)[:20]!r} is not accepted")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthorized("the token's issuer is not trusted")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthorized("the token names no signing key (kid)")
        key = await issuer.keys.key(kid)
        if key.algorithm_name and key.algorithm_name != alg:
            raise Unauthorized("the token's algorithm does not match its signing key")
        claims = _decode(token, key, alg, issuer)
        try:
            user_id = check_user_id(str(claims["sub"]))
        except InvalidInput:
            raise Unauthorized("the token's subject is not a usable user id") from None
        grants = None if issuer.own else grants_from_claim(claims.get(issuer.roles_claim))
        return Verified(user_id=user_id, issuer=issuer.name, grants=grants)


def _decode(token: str, key: jwt.PyJWK, alg: str, issuer: Issuer) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=issuer.audience,
            issuer=issuer.name,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired: sign in again") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized("the token's audience is not this API") from None
    except jwt.InvalidSignatureError:
        raise Unauthorized("the token's signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    return claims


def signing_key_path(settings: Settings) -> Path:
    """Where the gateway's signing key is kept."""
    return settings.auth_signing_key_file or settings.data_dir / KEY_FILE


def verifier_for(settings: Settings, own: SigningKey) -> TokenVerifier:
    """The verifier of the gateway's own tokens and, when configured, the OIDC provider's."""
    issuers = [Issuer(OWN_ISSUER, OWN_AUDIENCE, StaticKeySet(own.jwks()), own=True)]
    if settings.oidc_issuer:
        issuers.append(external_issuer(settings))
    return TokenVerifier(issuers)


def external_issuer(settings: Settings) -> Issuer:
    """The configured OIDC provider; :class:`InvalidInput` naming what is missing."""
    name = settings.oidc_issuer or ""
    if name == OWN_ISSUER:
        raise InvalidInput(
            f"invalid configuration: MC_OIDC_ISSUER: {OWN_ISSUER!r} is the gateway's"
        )
    if not settings.oidc_audience:
        raise InvalidInput("invalid configuration: MC_OIDC_AUDIENCE is required with an issuer")
    keys: KeySet
    if settings.oidc_jwks_file is not None:
        keys = StaticKeySet.from_file(settings.oidc_jwks_file)
    elif settings.oidc_jwks_url:
        keys = RemoteKeySet(settings.oidc_jwks_url)
    else:
        raise InvalidInput(
            "invalid configuration: MC_OIDC_JWKS_URL or MC_OIDC_JWKS_FILE is required with an "
            "issuer"
        )
    return Issuer(
        name, settings.oidc_audience, keys, own=False, roles_claim=settings.oidc_roles_claim
    )
