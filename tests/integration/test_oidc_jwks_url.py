"""An OIDC provider's keys fetched from its JWKS URL (``MC_OIDC_JWKS_URL``), served here on the
loopback by a small HTTP server: rotation, unknown kids, and the provider being down."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from libs.errors import TransientError, Unauthorized
from services.gateway.tokens import Issuer, RemoteKeySet, TokenVerifier

pytestmark = pytest.mark.integration

ISSUER = "https://idp.loopback.test/"
AUDIENCE = "mc"


@dataclass
class Provider:
    """Serves ``jwks`` at ``/jwks`` and counts the fetches."""

    url: str
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    fetches: int = 0


def _publish(provider: Provider, *keys: tuple[str, ec.EllipticCurvePrivateKey]) -> None:
    provider.jwks = {
        "keys": [
            {**ECAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid, "alg": "ES256"}
            for kid, k in keys
        ]
    }


@pytest.fixture
def provider() -> Iterator[Provider]:
    state = Provider(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            body = json.dumps(state.jwks).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _token(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ann", "iat": now, "exp": now + 60}
    return jwt.encode(claims, key, "ES256", headers={"kid": kid})


def _verifier(url: str) -> tuple[TokenVerifier, RemoteKeySet]:
    keys = RemoteKeySet(url)
    return TokenVerifier([Issuer(ISSUER, AUDIENCE, keys, own=False)]), keys


async def test_keys_are_fetched_once_and_a_rotated_key_is_picked_up(provider: Provider) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    _publish(provider, ("k1", first))
    verifier, keys = _verifier(provider.url)
    for _ in range(5):
        assert (await verifier.verify(_token(first, "k1"))).user_id == "ann"
    assert provider.fetches == 1, "the key set is cached"

    # The provider rotates: a token under the new kid makes the gateway fetch again.
    _publish(provider, ("k1", first), ("k2", second))
    keys.REFETCH_INTERVAL_S = 0.0
    assert (await verifier.verify(_token(second, "k2"))).user_id == "ann"
    assert provider.fetches == 2


async def test_made_up_kids_cannot_make_the_gateway_flood_the_provider(
    provider: Provider,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _publish(provider, ("k1", key))
    verifier, _ = _verifier(provider.url)
    await verifier.verify(_token(key, "k1"))
    for i in range(50):
        with pytest.raises(Unauthorized, match="kid"):
            await verifier.verify(_token(key, f"made-up-{i}"))
    assert provider.fetches == 1, "at most one fetch per interval"


async def test_a_provider_that_cannot_be_reached_is_a_503_not_a_401(provider: Provider) -> None:
    verifier, _ = _verifier("http://127.0.0.1:9/jwks")  # the discard port: nothing listens
    with pytest.raises(TransientError, match="cannot be fetched"):
        await verifier.verify(_token(ec.generate_private_key(ec.SECP256R1()), "k1"))
