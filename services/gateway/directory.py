"""The tenant's API keys and members: ``GET/POST /v1/api-keys``,
``POST /v1/api-keys/{key_id}:revoke`` and ``GET /v1/members``.

The gateway owns these tables (``gateway.api_keys``, ``gateway.users``, ``gateway.role_grants``)
and answers from them itself. Every query names the caller's tenant: a tenant lists and revokes
only its own keys (another tenant's key id is "not found") and sees only who holds a role in it.
A new key's secret is in the one answer that creates it (``Cache-Control: no-store``) and
nowhere else: only its hash is stored, and it is never logged or put in an event.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' dependency annotations,
# which are local to directory_routes.
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.events import KeyScope, Role
from services.gateway.auth import Authenticator
from services.gateway.domain import parse_key
from services.gateway.keys import issue_key, list_keys, revoke_key
from services.gateway.rbac import check_scopes
from services.gateway.schemas import NoNul
from services.gateway.users import tenant_members

KeyIdPath = Annotated[
    str, Path(pattern=r"^[a-z0-9]{12}$", description="The key's id (`mc_<key_id>_...`).")
]
KeyName = Annotated[str, StringConstraints(max_length=100), NoNul]


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class ApiKeyView(_Result):
    """An API key as listed: never its secret."""

    key_id: str
    name: str
    scopes: list[KeyScope]
    created_at: str = Field(description="ISO 8601, UTC.")
    revoked_at: str | None = Field(description="ISO 8601, UTC; `null` while the key is valid.")


class ApiKeyListing(_Result):
    """The tenant's keys, newest first (at most 1,000), revoked ones included."""

    keys: list[ApiKeyView]


class ApiKeyIn(BaseModel):
    """A new key: a name to recognise it by and its scopes (every scope when none is named)."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName = ""
    scopes: list[KeyScope] = Field(default_factory=list, max_length=3)


class ApiKeyIssued(_Result):
    """The new key. ``api_key`` is its only copy: store it now, it cannot be shown again."""

    key_id: str
    api_key: str = Field(description="`mc_<key_id>_<secret>`; send as `Authorization: Bearer`.")
    name: str
    scopes: list[KeyScope]


class ApiKeyRevoked(_Result):
    """The key is refused from now on (revoking it again changes nothing)."""

    key_id: str
    revoked: bool


class Member(_Result):
    """A user holding at least one role in the tenant."""

    user_id: str
    roles: list[Role]
    disabled: bool = Field(description="A disabled user can no longer sign in or use a token.")


class MemberListing(_Result):
    """The users holding a role in the caller's tenant, by id (at most 1,000)."""

    members: list[Member]


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(value), status, headers, media_type="application/json")


def directory_routes(
    router: APIRouter, read: Any, keys: Any, auth: Callable[[], Authenticator]
) -> None:
    """Add the key and member routes; ``read`` and ``keys`` are the permissions' dependencies,
    ``auth`` gives the started gateway's authenticator (whose pool holds the tables)."""
    Read = Annotated[Any, Depends(read)]
    Keys = Annotated[Any, Depends(keys)]

    def pool() -> Any:
        return auth().keys.pool

    @router.get("/api-keys", response_model=ApiKeyListing, tags=["auth"])
    async def list_api_keys(call: Read) -> Any:
        """The tenant's API keys: id, name, scopes, when issued and revoked (never a secret)."""
        return _json({"keys": await list_keys(pool(), call.principal.tenant_id)})

    @router.post("/api-keys", response_model=ApiKeyIssued, status_code=201, tags=["auth"])
    async def create_api_key(call: Keys, body: Annotated[ApiKeyIn | None, Body()] = None) -> Any:
        """Issue a key of the tenant (an admin's act, recorded as ``api_key.issued``). The
        answer holds the key's secret, once: it is stored only as a hash."""
        spec = body or ApiKeyIn()
        token = await issue_key(
            pool(), call.principal.tenant_id, spec.name, spec.scopes, actor=call.actor
        )
        answer = {
            "key_id": parse_key(token).key_id,
            "api_key": token,
            "name": spec.name,
            "scopes": check_scopes(spec.scopes),
        }
        return _json(answer, 201, {"Cache-Control": "no-store"})

    @router.post("/api-keys/{key_id}:revoke", response_model=ApiKeyRevoked, tags=["auth"])
    async def revoke_api_key(key_id: KeyIdPath, call: Keys) -> Any:
        """Revoke one of the tenant's keys (recorded as ``api_key.revoked``); every gateway
        refuses it once the revocation commits."""
        await revoke_key(pool(), key_id, actor=call.actor, tenant_id=call.principal.tenant_id)
        return _json({"key_id": key_id, "revoked": True})

    @router.get("/members", response_model=MemberListing, tags=["auth"])
    async def list_members(call: Read) -> Any:
        """The users who hold a role in the tenant: their roles here and whether they are
        disabled (no other tenant's roles, no password hashes)."""
        return _json({"members": await tenant_members(pool(), call.principal.tenant_id)})
