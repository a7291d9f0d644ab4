"""Admission's NATS request routes: ``mc.rpc.admission.admit`` and ``mc.rpc.admission.policies``."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts import utcnow
from libs.contracts.envelope import TenantId
from libs.contracts.limits import (
    AGENT_ID_PATTERN,
    MAX_ACTOR,
    MAX_NAME,
    MAX_REASON,
    RUN_ID_PATTERN,
)
from libs.contracts.policy import (
    BUNDLE_DIGEST_PATTERN,
    DEFAULT_ENVIRONMENT,
    MAX_PUBLIC_KEY_PEM,
    MAX_SETTINGS_VERSION,
    SIGNING_KEY_ID_PATTERN,
    Environment,
)
from libs.contracts.subjects import events_filter
from libs.errors import InvalidInput
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import Headers, RpcServer
from libs.policy_bundles import MAX_ARCHIVE_BYTES, BundleTooLarge
from services.policy_admission.domain import AdmitRequest
from services.policy_admission.handlers import AdmissionHandler
from services.policy_admission.hook_handler import HookHandler
from services.policy_admission.hooks import HookActor, HookContext, parse_hook
from services.policy_admission.tenant_bundles import TenantPolicies

RPC_SERVICE = "admission"
STEPS_DURABLE = "admission-steps"


def steps_consumer_spec(durable: str = STEPS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of ``run.step_recorded`` that judges marked steps (tests narrow
    durable and tenant)."""
    return ConsumerSpec(
        durable=durable, filter_subjects=(events_filter("run.step_recorded", tenant_id),)
    )


class AdmitCall(AdmitRequest):
    """``admit``: the step to decide on, with the ``tenant_id`` the gateway sets."""

    tenant_id: TenantId


Actor = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ACTOR)]


class _Call(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: TenantId


class _Admin(_Call):
    actor: Actor = "service:gateway"


class UploadCall(_Admin):
    """``upload_bundle``: the archive (base64) for one environment."""

    environment: Environment = DEFAULT_ENVIRONMENT
    archive_b64: str = Field(max_length=(MAX_ARCHIVE_BYTES * 4) // 3 + 8)


class ActivateCall(_Admin):
    """``activate_bundle``: the digest to activate (required: an unpinned reload is refused
    by name, not by schema)."""

    environment: Environment = DEFAULT_ENVIRONMENT
    bundle_digest: str | None = Field(default=None, pattern=BUNDLE_DIGEST_PATTERN)


class ListBundlesCall(_Call):
    """``list_bundles``."""

    environment: Environment = DEFAULT_ENVIRONMENT


class PutKeyCall(_Admin):
    """``put_signing_key``: register an ed25519 public key (PEM) under ``key_id``."""

    key_id: str = Field(pattern=SIGNING_KEY_ID_PATTERN)
    public_key: str = Field(min_length=1, max_length=MAX_PUBLIC_KEY_PEM)


class RetireKeyCall(_Admin):
    """``retire_signing_key``."""

    key_id: str = Field(pattern=SIGNING_KEY_ID_PATTERN)
    reason: str | None = Field(default=None, max_length=MAX_REASON)


class PutSettingsCall(_Admin):
    """``put_settings``: the whole settings document and, optionally, the version it replaces."""

    settings: dict[str, Any]
    version: int | None = Field(default=None, ge=0, le=MAX_SETTINGS_VERSION)


class GrantExceptionCall(_Admin):
    """``grant_exception``: waive ``policy_id`` for one agent or one run until ``expires_at``."""

    exception_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
    policy_id: str = Field(min_length=1, max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f]+$")
    agent_id: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    reason: str = Field(min_length=1, max_length=MAX_REASON)
    expires_at: datetime


class RevokeExceptionCall(_Admin):
    """``revoke_exception``."""

    exception_id: str = Field(min_length=1, max_length=100)
    reason: str | None = Field(default=None, max_length=MAX_REASON)


class ListExceptionsCall(_Call):
    """``list_exceptions``: all of them, or those of one status."""

    status: Literal["open", "expired", "revoked"] | None = None


class HookCall(_Call):
    """``evaluate_hook``: the hook (named, so an unknown one is refused by name) and its input
    context (``services.policy_admission.hooks.HookContext``)."""

    hook: str = Field(min_length=1, max_length=MAX_NAME)
    actor: HookActor
    environment: Environment = DEFAULT_ENVIRONMENT
    agent: dict[str, Any] | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    change: dict[str, Any] | None = None

    def context(self) -> HookContext:
        """The hook's input context; :class:`InvalidInput` for an unknown hook."""
        return HookContext(
            hook=parse_hook(self.hook),
            actor=self.actor,
            environment=self.environment,
            agent=self.agent,
            request=self.request,
            change=self.change,
        )


def _archive(call: UploadCall) -> bytes:
    try:
        archive = base64.b64decode(call.archive_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("bundle_malformed: the archive is not valid base64") from None
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise BundleTooLarge(
            "bundle_too_large", f"the archive is over the {MAX_ARCHIVE_BYTES:,} bytes allowed"
        )
    return archive


def bundle_routes(server: RpcServer, tenants: TenantPolicies) -> None:
    """The signed-bundle, signing-key and settings requests (``docs/policies.md``)."""

    @server.handler("upload_bundle")
    async def upload_bundle(body: UploadCall) -> dict[str, Any]:
        """Verify, compile and test a signed bundle; store it by digest (not activated)."""
        return await tenants.upload(body.tenant_id, body.environment, _archive(body), body.actor)

    @server.handler("activate_bundle")
    async def activate_bundle(body: ActivateCall) -> dict[str, Any]:
        """Activate an uploaded bundle by its digest, after verifying it again."""
        return await tenants.activate(
            body.tenant_id, body.environment, body.bundle_digest, body.actor
        )

    @server.handler("list_bundles")
    async def list_bundles(body: ListBundlesCall) -> dict[str, Any]:
        """The tenant's uploaded bundles of one environment and the active one."""
        return await tenants.bundle_listing(body.tenant_id, body.environment)

    @server.handler("put_signing_key")
    async def put_signing_key(body: PutKeyCall) -> dict[str, Any]:
        """Register a signing key (the same key again changes nothing)."""
        return await tenants.register_key(body.tenant_id, body.key_id, body.public_key, body.actor)

    @server.handler("retire_signing_key")
    async def retire_signing_key(body: RetireKeyCall) -> dict[str, Any]:
        """Retire a signing key: it signs nothing from now on."""
        return await tenants.retire_key(body.tenant_id, body.key_id, body.reason, body.actor)

    @server.handler("list_signing_keys")
    async def list_signing_keys(body: _Call) -> dict[str, Any]:
        """The tenant's signing keys, active and retired."""
        return await tenants.key_listing(body.tenant_id)

    @server.handler("get_settings")
    async def get_settings(body: _Call) -> dict[str, Any]:
        """The tenant's settings and their version."""
        return await tenants.get_settings(body.tenant_id)

    @server.handler("put_settings")
    async def put_settings(body: PutSettingsCall) -> dict[str, Any]:
        """Replace the tenant's settings (409 if ``version`` is not the current one)."""
        return await tenants.put_settings(body.tenant_id, body.settings, body.version, body.actor)

    @server.handler("grant_exception")
    async def grant_exception(body: GrantExceptionCall) -> dict[str, Any]:
        """Record a time-bound policy exception; every replica applies it."""
        return await tenants.grant_exception(
            body.tenant_id, body.model_dump(), body.actor, utcnow().replace(microsecond=0)
        )

    @server.handler("revoke_exception")
    async def revoke_exception(body: RevokeExceptionCall) -> dict[str, Any]:
        """Withdraw a policy exception before its expiry."""
        return await tenants.revoke_exception(
            body.tenant_id, body.exception_id, body.reason, body.actor, utcnow()
        )

    @server.handler("list_exceptions")
    async def list_exceptions(body: ListExceptionsCall) -> dict[str, Any]:
        """The tenant's policy exceptions and the burndown of the open ones."""
        return await tenants.list_exceptions(body.tenant_id, body.status, utcnow())

    @server.handler("status")
    async def status(body: _Call) -> dict[str, Any]:
        """What decides for the tenant, per environment, and its settings."""
        return tenants.status(body.tenant_id)


def rpc_server(
    nc: NATS, handler: AdmissionHandler, tenants: TenantPolicies | None = None
) -> RpcServer:
    """An (unstarted) RPC server routing ``admit`` and ``policies`` to ``handler`` (and, with
    ``tenants``, the bundle, key and settings requests)."""
    server = RpcServer(nc, RPC_SERVICE)
    if tenants is not None:
        bundle_routes(server, tenants)

    # The hot path: served on bare nats-py, FastStream's per-message cost measured too high for
    # it (docs/benchmarks.md); parsing, answers and bounds are the same as on every route.
    @server.handler("admit", hot=True)
    async def admit(body: AdmitCall, headers: Headers) -> dict[str, Any]:
        """Decide whether a step may run; answered once the decision is durable."""
        return await handler.admit_parsed(body.tenant_id, body, headers)

    hooks = HookHandler(handler)

    @server.handler("evaluate_hook")
    async def evaluate_hook(body: HookCall, headers: Headers) -> dict[str, Any]:
        """A lifecycle hook's decision (recorded as ``policy.hook_evaluated`` unless it is
        ``before_execute``, which only evaluates)."""
        return await hooks.evaluate(body.tenant_id, body.context(), headers)

    @server.handler("policies")
    async def policies(body: dict[str, Any]) -> dict[str, Any]:
        """The active bundle's digest and every policy's metadata."""
        return handler.policies()

    return server
