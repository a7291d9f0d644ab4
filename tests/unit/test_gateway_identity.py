"""People's tokens, passwords, roles and scopes: what the gateway accepts and refuses, and why."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import ECAlgorithm

from libs.errors import Forbidden, InvalidInput, Unauthorized
from libs.settings import Settings
from services.gateway.domain import hash_password, password_matches
from services.gateway.rbac import (
    ALL_SCOPES,
    ROLES,
    RULES,
    KeyPrincipal,
    Permission,
    UserPrincipal,
    authorize,
    check_scopes,
    choose_tenant,
    grants_from_claim,
)
from services.gateway.tokens import (
    OWN_AUDIENCE,
    OWN_ISSUER,
    Issuer,
    SigningKey,
    StaticKeySet,
    TokenVerifier,
    external_issuer,
    verifier_for,
)

pytestmark = pytest.mark.unit

IDP = "https://idp.example.test/"
IDP_AUDIENCE = "mission-control-api"


@pytest.fixture(scope="module")
def own() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def idp_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _idp_jwks(key: ec.EllipticCurvePrivateKey, kid: str = "idp-1") -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": kid, "alg": "ES256", "use": "sig"}]}


@pytest.fixture
def verifier(own: SigningKey, idp_key: ec.EllipticCurvePrivateKey) -> TokenVerifier:
    return TokenVerifier(
        [
            Issuer(OWN_ISSUER, OWN_AUDIENCE, StaticKeySet(own.jwks()), own=True),
            Issuer(IDP, IDP_AUDIENCE, StaticKeySet(_idp_jwks(idp_key)), own=False),
        ]
    )


def _idp_token(key: ec.EllipticCurvePrivateKey, kid: str = "idp-1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": IDP, "aud": IDP_AUDIENCE, "sub": "ann@example.com", "iat": now, "exp": now + 60}
    body.update(claims)
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None},
        key,
        algorithm="ES256",
        headers={"kid": kid},
    )


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- token validation -----------------------------------------------------------------------------


async def test_the_gateways_own_token_is_accepted_and_names_its_user(
    own: SigningKey, verifier: TokenVerifier
) -> None:
    token = own.issue("alice", {"acme": frozenset({"operator"})}, ttl_s=60)
    verified = await verifier.verify(token)
    assert (verified.user_id, verified.issuer) == ("alice", OWN_ISSUER)
    # The gateway's own tokens are authorized from its records, not from their claim.
    assert verified.grants is None
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("EdDSA", own.kid)


async def test_an_external_providers_token_carries_its_roles_claim(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    token = _idp_token(idp_key, mc_roles={"acme": ["viewer", "approver"], "beta": "admin"})
    verified = await verifier.verify(token)
    assert verified.user_id == "ann@example.com"
    assert verified.grants == {
        "acme": frozenset({"viewer", "approver"}),
        "beta": frozenset({"admin"}),
    }


async def test_an_expired_token_is_refused(own: SigningKey, verifier: TokenVerifier) -> None:
    token = own.issue("alice", {}, ttl_s=60, now=time.time() - 3600)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(token)


async def test_a_token_for_another_audience_is_refused(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(Unauthorized, match="audience"):
        await verifier.verify(_idp_token(idp_key, aud="some-other-api"))
    with pytest.raises(Unauthorized, match="aud"):
        await verifier.verify(_idp_token(idp_key, aud=None))


async def test_a_token_of_an_untrusted_issuer_is_refused(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    for iss in ("https://evil.example.test/", None):
        with pytest.raises(Unauthorized, match="issuer"):
            await verifier.verify(_idp_token(idp_key, iss=iss))
    head, _, sig = _idp_token(idp_key).split(".")
    not_a_string = {"iss": 7, "aud": IDP_AUDIENCE, "sub": "x", "iat": 0, "exp": 2**40}
    with pytest.raises(Unauthorized, match="issuer"):
        await verifier.verify(f"{head}.{_b64(not_a_string)}.{sig}")


async def test_a_token_with_a_bad_signature_is_refused(
    own: SigningKey, verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    # Signed by another key under the trusted key's id.
    forger = SigningKey(Ed25519PrivateKey.generate())
    forged = jwt.encode(
        {"iss": OWN_ISSUER, "aud": OWN_AUDIENCE, "sub": "root", "iat": 0, "exp": 2**40},
        forger.private,
        algorithm="EdDSA",
        headers={"kid": own.kid},
    )
    with pytest.raises(Unauthorized, match="signature"):
        await verifier.verify(forged)
    # A genuine token whose claims were edited after signing.
    head, _, sig = own.issue("alice", {}, ttl_s=60).split(".")
    claims = {"iss": OWN_ISSUER, "aud": OWN_AUDIENCE, "sub": "root", "iat": 0, "exp": 2**40}
    with pytest.raises(Unauthorized, match="signature"):
        await verifier.verify(f"{head}.{_b64(claims)}.{sig}")


async def test_alg_none_and_hmac_with_the_public_key_are_refused(
    own: SigningKey, verifier: TokenVerifier
) -> None:
    claims = {"iss": OWN_ISSUER, "aud": OWN_AUDIENCE, "sub": "root", "iat": 0, "exp": 2**40}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': own.kid})}.{_b64(claims)}."
    with pytest.raises(Unauthorized, match="algorithm"):
        await verifier.verify(unsigned)
    # The classic confusion: HS256 keyed with the (public) verification key.
    public_pem = (
        own.private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    hmac_header = _b64({"alg": "HS256", "typ": "JWT", "kid": own.kid})
    signing_input = f"{hmac_header}.{_b64(claims)}"
    mac = hmac.new(public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(Unauthorized, match="algorithm"):
        await verifier.verify(confused)


async def test_an_unknown_kid_or_no_kid_is_refused(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(Unauthorized, match="kid"):
        await verifier.verify(_idp_token(idp_key, kid="rotated-away"))
    no_kid = jwt.encode(
        {"iss": IDP, "aud": IDP_AUDIENCE, "sub": "x", "iat": 0, "exp": 2**40},
        idp_key,
        algorithm="ES256",
    )
    with pytest.raises(Unauthorized, match="kid"):
        await verifier.verify(no_kid)


async def test_an_algorithm_other_than_the_keys_is_refused(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    # The provider's key is published for ES256; the same key may not sign ES384 tokens.
    token = jwt.encode(
        {"iss": IDP, "aud": IDP_AUDIENCE, "sub": "x", "iat": 0, "exp": 2**40},
        ec.generate_private_key(ec.SECP384R1()),
        algorithm="ES384",
        headers={"kid": "idp-1"},
    )
    with pytest.raises(Unauthorized, match="algorithm"):
        await verifier.verify(token)


async def test_malformed_tokens_and_missing_claims_are_refused(
    verifier: TokenVerifier, idp_key: ec.EllipticCurvePrivateKey
) -> None:
    for garbage in ("not-a-token", "a.b.c", "x" * 20_000):
        with pytest.raises(Unauthorized, match="malformed"):
            await verifier.verify(garbage)
    with pytest.raises(Unauthorized, match="exp"):
        await verifier.verify(_idp_token(idp_key, exp=None))
    with pytest.raises(Unauthorized, match="subject"):
        await verifier.verify(_idp_token(idp_key, sub="has spaces and\nnewlines"))


def test_the_roles_claim_is_read_in_both_documented_shapes() -> None:
    assert grants_from_claim({"acme": ["viewer", "wizard"], "b": "admin", "c": 3}) == {
        "acme": frozenset({"viewer"}),
        "b": frozenset({"admin"}),
    }
    groups = ["acme:operator", "everyone", "beta:approver", "beta:unknown", 5]
    assert grants_from_claim(groups) == {
        "acme": frozenset({"operator"}),
        "beta": frozenset({"approver"}),
    }
    assert grants_from_claim(None) == {}
    assert grants_from_claim("admin") == {}


def test_an_issuer_without_audience_or_keys_is_a_configuration_error(tmp_path: Path) -> None:
    base = {"MC_DATA_DIR": str(tmp_path), "MC_OIDC_ISSUER": IDP}
    with pytest.raises(InvalidInput, match="MC_OIDC_AUDIENCE"):
        external_issuer(Settings(**base))
    with pytest.raises(InvalidInput, match="MC_OIDC_JWKS"):
        external_issuer(Settings(**base, MC_OIDC_AUDIENCE="a"))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(_idp_jwks(ec.generate_private_key(ec.SECP256R1()))))
    issuer = external_issuer(Settings(**base, MC_OIDC_AUDIENCE="a", MC_OIDC_JWKS_FILE=str(jwks)))
    assert (issuer.name, issuer.audience, issuer.own) == (IDP, "a", False)
    own = SigningKey(Ed25519PrivateKey.generate())
    assert set(verifier_for(Settings(MC_DATA_DIR=str(tmp_path)), own).issuers) == {OWN_ISSUER}


# --- the signing key ------------------------------------------------------------------------------


def test_the_signing_key_is_made_once_mode_0600_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "gateway" / "auth-signing-key.pem"
    first = SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = SigningKey.load_or_create(path)
    assert again.kid == first.kid
    assert first.jwks()["keys"][0]["kid"] == first.kid
    assert "d" not in first.jwks()["keys"][0], "the private part must never be published"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    os.chmod(path, 0o440)  # a Kubernetes Secret mounted for the pod's group
    assert SigningKey.load_or_create(path).kid == first.kid
    for open_mode in (0o644, 0o660, 0o604):
        os.chmod(path, open_mode)
        with pytest.raises(InvalidInput, match="chmod 600"):
            SigningKey.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_text("CHANGE-ME")
    with pytest.raises(InvalidInput, match="not a PEM private key"):
        SigningKey.load_or_create(path)


# --- passwords ------------------------------------------------------------------------------------


def test_passwords_are_stored_as_salted_argon2id_hashes() -> None:
    password = "correct horse battery staple"
    first, second = hash_password(password), hash_password(password)
    assert first.startswith("$argon2id$")
    assert password not in first
    assert first != second, "each hash has its own salt"
    assert password_matches(first, password)
    assert password_matches(second, password)
    assert not password_matches(first, password + "!")
    assert not password_matches(first, "")
    assert not password_matches("not a hash", password)


def test_too_short_or_too_long_passwords_are_refused() -> None:
    for bad in ("short", "", "x" * 1025):
        with pytest.raises(InvalidInput, match="password"):
            hash_password(bad)


# --- roles, scopes and tenants --------------------------------------------------------------------


def test_keys_are_authorized_by_scope_and_users_by_role() -> None:
    reader = KeyPrincipal("acme", "k1", frozenset({"read"}))
    authorize(reader, Permission.READ)
    with pytest.raises(Forbidden, match="lacks the scope 'ingest'"):
        authorize(reader, Permission.INGEST)
    authorize(KeyPrincipal("acme", "k2"), Permission.OPERATE)  # keys made before scopes: all
    viewer = UserPrincipal("acme", "vic", frozenset({"viewer"}))
    authorize(viewer, Permission.READ)
    with pytest.raises(Forbidden, match=r"'vic' may not .* in tenant 'acme'.*operator or admin"):
        authorize(viewer, Permission.INGEST)
    # Every role reads; only admin configures and operates.
    for role in ROLES:
        authorize(UserPrincipal("acme", "u", frozenset({role})), Permission.READ)
    assert RULES[Permission.CONFIGURE].roles == {"admin"}
    assert RULES[Permission.OPERATE].roles == {"admin"}


def test_a_user_acts_only_in_a_tenant_they_hold_a_role_in() -> None:
    grants = {"acme": frozenset({"viewer"}), "beta": frozenset({"admin"})}
    assert choose_tenant("u", grants, "beta") == "beta"
    with pytest.raises(Forbidden, match="no role in tenant 'gamma'"):
        choose_tenant("u", grants, "gamma")
    with pytest.raises(InvalidInput, match="X-Tenant-Id"):
        choose_tenant("u", grants, None)
    assert choose_tenant("u", {"acme": frozenset({"viewer"})}, None) == "acme"
    with pytest.raises(Forbidden, match="no role in any tenant"):
        choose_tenant("u", {"acme": frozenset()}, None)


def test_key_scopes_are_checked_and_default_to_all() -> None:
    assert check_scopes([]) == ["ingest", "admit", "read"]
    assert check_scopes(["read", "admit", "read"]) == ["admit", "read"]
    assert set(check_scopes(())) == ALL_SCOPES
    with pytest.raises(InvalidInput, match="unknown scope write"):
        check_scopes(["write"])
