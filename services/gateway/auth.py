"""Authentication of every ``/v1`` request: an agent's API key or a person's bearer token.

:class:`Authenticator` turns the presented credential into a principal of one tenant; the route's
dependency (``services.gateway.entrypoints``) then checks the permission the route declares with
:func:`services.gateway.rbac.authorize`. API keys start with ``mc_``; anything else is taken for a
JWT and validated by :class:`~services.gateway.tokens.TokenVerifier`.

A person's roles come from the gateway's own records for the gateway's own tokens (so a revoked
role or a disabled user stops at once, not when the token expires), and from the provider's roles
claim for an external provider's. A user disabled here is refused whichever issued the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libs.errors import Forbidden, Unauthorized
from services.gateway.domain import KEY_PREFIX
from services.gateway.keys import KeyVerifier
from services.gateway.rbac import Principal, UserPrincipal, choose_tenant
from services.gateway.tokens import SigningKey, TokenVerifier
from services.gateway.users import UserDirectory

TENANT_HEADER = "X-Tenant-Id"


@dataclass(frozen=True)
class Authenticator:
    """What the gateway authenticates with: keys, tokens, users, and its own signing key."""

    keys: KeyVerifier
    tokens: TokenVerifier
    users: UserDirectory
    signer: SigningKey
    token_ttl_s: int

    async def authenticate(self, credential: str, tenant: str | None) -> Principal:
        """The principal ``credential`` proves, acting in ``tenant`` (``X-Tenant-Id``) if named."""
        if credential.startswith(f"{KEY_PREFIX}_"):
            key = await self.keys.verify(credential)
            if tenant and tenant != key.tenant_id:
                raise Forbidden(f"this API key is not valid in tenant {tenant[:64]!r}")
            return key
        verified = await self.tokens.verify(credential)
        record = await self.users.get(verified.user_id)
        if record is not None and record.disabled:
            raise Unauthorized(f"user {verified.user_id!r} is disabled")
        if verified.grants is not None:
            grants = verified.grants
        elif record is not None:
            grants = record.grants
        else:
            raise Unauthorized(f"user {verified.user_id!r} does not exist")
        chosen = choose_tenant(verified.user_id, grants, tenant[:64] if tenant else None)
        return UserPrincipal(chosen, verified.user_id, grants[chosen])

    async def issue_token(self, user_id: str, password: str) -> dict[str, Any]:
        """A signed token for the user whose password this is (``POST /v1/auth/token``)."""
        record = await self.users.login(user_id, password)
        token = self.signer.issue(record.user_id, record.grants, self.token_ttl_s)
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_ttl_s,
            "tenants": {t: sorted(r) for t, r in sorted(record.grants.items())},
        }


def whoami(principal: Principal) -> dict[str, Any]:
    """``GET /v1/auth/whoami``: who the caller is, in which tenant, holding what."""
    if isinstance(principal, UserPrincipal):
        return {
            "kind": "user",
            "actor": principal.actor,
            "tenant_id": principal.tenant_id,
            "roles": sorted(principal.roles),
            "scopes": [],
        }
    return {
        "kind": "api_key",
        "actor": principal.actor,
        "tenant_id": principal.tenant_id,
        "roles": [],
        "scopes": sorted(principal.scopes),
    }
