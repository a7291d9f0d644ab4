"""Request and answer shapes of the gateway's policy bundle, signing key and settings routes (in
``entrypoints``); the routes forward to policy-admission (``mc.rpc.admission.*``) with the
caller's tenant. See ``docs/policies.md``.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.limits import RUN_ID_PATTERN
from libs.contracts.policy import (
    BUNDLE_DIGEST_PATTERN,
    MAX_PUBLIC_KEY_PEM,
    MAX_SETTINGS_VERSION,
    SIGNING_KEY_ID_PATTERN,
    CanaryPlan,
    Environment,
    PolicySettings,
)
from libs.errors import InvalidInput, TooLarge
from services.gateway.schemas import POLICY_ID_PATTERN, AgentId, NoNul, Reason

EXCEPTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"

MAX_BUNDLE_BYTES = 512 * 1024
"""The largest archive accepted (policy-admission holds the same bound)."""
UPLOAD_TIMEOUT_S = 60.0
"""An upload compiles the bundle and runs its tests before it answers."""

EnvironmentQuery = Annotated[
    Environment, Query(description="The environment: sandbox or production (the default).")
]
DigestPath = Annotated[
    str,
    Path(pattern=BUNDLE_DIGEST_PATTERN, description="The bundle's digest, sha256:<64 hex>."),
]
OptionalDigest = Annotated[
    str | None,
    Query(pattern=BUNDLE_DIGEST_PATTERN, description="The bundle's digest, sha256:<64 hex>."),
]
KeyIdPath = Annotated[
    str, Path(pattern=SIGNING_KEY_ID_PATTERN, description="The signing key's id (the JWT kid).")
]
PublicKeyPem = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PUBLIC_KEY_PEM), NoNul]

BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A signed bundle: a tar.gz in OPA's layout with .manifest (revision), "
        "data.json files, *.rego policies and tests, and .signatures.json (see "
        "docs/policies.md).",
        # Described as octet-stream (what generic clients send); application/gzip is read alike.
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


async def read_bundle(request: Request) -> str:
    """The request's archive, base64-encoded for the bus; 413 past :data:`MAX_BUNDLE_BYTES`."""
    raw = await request.body()
    if len(raw) > MAX_BUNDLE_BYTES:
        raise TooLarge(
            f"bundle_too_large: the archive is {len(raw):,} bytes, over the "
            f"{MAX_BUNDLE_BYTES:,} bytes allowed"
        )
    if not raw:
        raise InvalidInput("bundle_malformed: the body is empty; send the bundle's tar.gz")
    return base64.b64encode(raw).decode("ascii")


class SigningKeyIn(BaseModel):
    """An ed25519 public key (PEM, SubjectPublicKeyInfo) allowed to sign the tenant's bundles."""

    model_config = ConfigDict(extra="forbid")

    public_key: PublicKeyPem
    algorithm: Literal["EdDSA"] = "EdDSA"


class RetireKeyIn(BaseModel):
    """Why the key is retired (recorded)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = None


class PolicySettingsIn(PolicySettings):
    """The tenant's whole settings document (a field left out falls back to the bundle) and,
    optionally, the ``version`` it replaces (or send ``If-Match``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int | None = Field(default=None, ge=0, le=MAX_SETTINGS_VERSION)


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class BundleStored(_Result):
    """A verified, compiled and tested bundle, stored by digest (``activated``: it now decides;
    ``reload``: the reload an activation started)."""

    bundle_digest: str
    environment: Environment
    revision: str
    signer_key_id: str
    files: int
    policies: list[str]
    created: bool
    activated: bool


class BundleSummary(_Result):
    """One uploaded bundle."""

    bundle_digest: str
    revision: str
    signer_key_id: str
    active: bool


class BundleListing(_Result):
    """The tenant's uploaded bundles of one environment (oldest revision first)."""

    environment: Environment
    active_digest: str | None
    bundles: list[BundleSummary]


class SigningKeyView(_Result):
    """A signing key; ``retired`` keys sign nothing more."""

    key_id: str
    algorithm: str
    fingerprint: str
    public_key: str
    status: Literal["active", "retired"]


class SigningKeyListing(_Result):
    """The tenant's signing keys; ``changed`` says whether the request changed anything."""

    keys: list[SigningKeyView]
    changed: bool | None = None


class PolicySettingsView(_Result):
    """The tenant's settings and their version (0: never set)."""

    version: int
    settings: dict[str, Any]


ExceptionIdPath = Annotated[
    str, Path(pattern=EXCEPTION_ID_PATTERN, description="The policy exception's id.")
]
ExceptionStatus = Literal["open", "expired", "revoked"]
ExceptionStatusQuery = Annotated[
    ExceptionStatus | None,
    Query(description="Only the exceptions of this status: open, expired or revoked."),
]


class PolicyExceptionIn(BaseModel):
    """A time-bound waiver of one policy for one agent or one run (name exactly one)."""

    model_config = ConfigDict(extra="forbid")

    exception_id: Annotated[str, StringConstraints(pattern=EXCEPTION_ID_PATTERN)] | None = Field(
        default=None,
        description="Your id for it, so that a retried grant is safe: the same id with the same "
        "terms answers the exception already granted, with other terms a 409. Default: a new "
        "id.",
    )
    policy_id: Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)] = Field(
        description="The policy the waived denials name (a reason's `policy_id`)."
    )
    agent_id: AgentId | None = None
    run_id: Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)] | None = None
    reason: Reason
    expires_at: AwareDatetime = Field(
        description="When it stops applying (UTC, to the second): later than now and at most "
        "90 days ahead."
    )


class RevokeExceptionIn(BaseModel):
    """Why the exception is withdrawn (recorded)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = None


class PolicyExceptionView(_Result):
    """A policy exception; ``closed_by`` names who revoked it (or ``expiry``)."""

    exception_id: str
    policy_id: str
    agent_id: str | None
    run_id: str | None
    reason: str
    granted_by: str
    granted_at: str
    expires_at: str
    status: ExceptionStatus
    closed_by: str | None = None


class BurndownDay(_Result):
    """How many open exceptions expire on one UTC day."""

    day: str
    open: int


class PolicyExceptionListing(_Result):
    """The tenant's policy exceptions and the burndown of the open ones by expiry day."""

    exceptions: list[PolicyExceptionView]
    burndown: list[BurndownDay]


def if_match_version(value: str | None) -> int | None:
    """An ``If-Match`` header's settings version (``"3"`` or ``W/"3"``), if any."""
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 10:
        raise InvalidInput('If-Match: expected the settings version, like "3"')
    return int(text)


def settings_payload(body: PolicySettingsIn, if_match: str | None) -> dict[str, Any]:
    """The ``put_settings`` request: the settings and the version they replace."""
    header = if_match_version(if_match)
    version = body.version if body.version is not None else header
    settings = body.model_dump(mode="json", exclude_none=True, exclude={"version"})
    return {"settings": settings, "version": version}


FreezeEnvironmentPath = Annotated[
    Literal["sandbox", "production"],
    Path(description="The environment whose promotions are frozen: sandbox or production."),
]


class FreezeOverrideIn(BaseModel):
    """Why promotions may go ahead despite the open incidents (recorded with your identity)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason


class FreezingIncidentView(_Result):
    """An open incident freezing promotions; ``overridden_by`` once an admin let them through."""

    incident_id: str
    severity: str
    title: str
    opened_at: str
    overridden_by: str | None = None


class FreezeOverrideView(_Result):
    """One audited override: who, why, when and the incidents it covered."""

    by: str
    reason: str
    at: str
    incident_ids: list[str]


class EnvironmentFreezeView(_Result):
    """One environment's promotion freeze: frozen while an incident at or above ``threshold``
    is open and not overridden."""

    environment: str
    frozen: bool
    threshold: str
    incidents: list[FreezingIncidentView]
    overrides: list[FreezeOverrideView]


class PolicyFreezeView(_Result):
    """The tenant's promotion freeze, per environment."""

    environments: list[EnvironmentFreezeView]


class RecordedDriftView(_Result):
    """The drift on record: its fingerprint, where the environments differ, each one's hashes,
    and who accepted it (if anyone)."""

    fingerprint: str
    dimensions: list[str]
    snapshots: dict[str, dict[str, str]]
    detected_at: str
    acknowledged_by: str | None = None
    acknowledged_reason: str | None = None


class PolicyDriftView(_Result):
    """Sandbox and production compared now (``drifted``, ``dimensions``, ``snapshots``), the
    drift on record and what it blocks (``blocking``: empty unless promotions are blocked)."""

    drifted: bool
    dimensions: list[str]
    snapshots: dict[str, dict[str, str]]
    blocking: list[str]
    recorded: RecordedDriftView | None = None
    detections: int
    interval_s: float


class DriftAcknowledgeIn(BaseModel):
    """Accept the drift on record, with a reason (recorded with your identity)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason
    fingerprint: Annotated[str, StringConstraints(pattern=BUNDLE_DIGEST_PATTERN)] | None = Field(
        default=None,
        description="The drift you looked at (`recorded.fingerprint`); if the drift changed since, "
        "409 `drift_changed` instead of accepting drift you have not seen.",
    )


class DriftAlignIn(BaseModel):
    """Which environment's bundle the other one should decide with."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["sandbox", "production"] = Field(
        description="The environment to copy from; its bundle is uploaded to and activated in "
        "the other one."
    )


# -- canary reloads and webhooks (docs/policies.md, "Canary and rollback") -------------------------

RELOAD_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
ReloadIdPath = Annotated[str, Path(pattern=RELOAD_ID_PATTERN, description="The reload's id.")]
WebhookIdPath = Annotated[str, Path(pattern=RELOAD_ID_PATTERN, description="The webhook's id.")]
OptionalEnvironmentQuery = Annotated[
    Environment | None, Query(description="Only this environment's reloads (default: both).")
]
WebhookUrl = Annotated[str, StringConstraints(min_length=8, max_length=2000), NoNul]


class ActivateIn(BaseModel):
    """How the reload is tried: as a canary (``canary``: its plan; the default plan if left
    out) or, ``immediate``, for every run at once."""

    model_config = ConfigDict(extra="forbid")

    canary: CanaryPlan | None = None
    immediate: bool = False


class EndCanaryIn(BaseModel):
    """Why an operator ends the canary (recorded)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = None


class WebhookIn(BaseModel):
    """A URL to POST every reload outcome to (http or https, no credentials in it)."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl


class ArmFigures(_Result):
    """One arm of a canary: what its bundle decided."""

    decisions: int
    denies: int
    errors: int
    deny_rate: float
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None


class ReloadFigures(_Result):
    """The canary against the stable bundle (empty for an immediate reload)."""

    canary: ArmFigures | None = None
    stable: ArmFigures | None = None
    deny_rate_delta: float | None = None
    p95_delta_ms: float | None = None
    elapsed_s: float | None = None


class ReloadReport(_Result):
    """A reload's impact report: the candidate and the bundle it was tried against, the plan,
    the figures (live while ``status`` is ``canary``) and the outcome."""

    reload_id: str
    environment: Environment
    bundle_digest: str
    revision: str | None
    stable_digest: str
    plan: dict[str, Any] | None
    status: Literal["canary", "promoted", "rolled_back"]
    reason: str | None
    detail: str
    figures: ReloadFigures
    started_at: str
    started_by: str
    ended_at: str | None
    ended_by: str | None


class ReloadListing(_Result):
    """The tenant's reloads, newest first."""

    reloads: list[ReloadReport]


class WebhookCreated(_Result):
    """A new subscription; ``secret`` signs its deliveries and is shown only this once."""

    webhook_id: str
    url: str
    created_by: str
    created_at: str
    secret: str


class WebhookDeliveries(_Result):
    """How many reports wait, reached the receiver, or were given up on."""

    pending: int
    delivered: int
    failed: int


class WebhookView(_Result):
    """A subscription (its secret is never shown again)."""

    webhook_id: str
    url: str
    created_by: str
    created_at: str
    deliveries: WebhookDeliveries


class WebhookListing(_Result):
    """The tenant's webhook subscriptions."""

    webhooks: list[WebhookView]


class WebhookDeleted(_Result):
    """An unsubscribed webhook."""

    webhook_id: str
    deleted: bool


ChaosCase = Literal["partial_reload_failure", "conflicting_policies", "expiry_storm", "agent_load"]


class ChaosIn(BaseModel):
    """One chaos case, in a non-production environment (production is refused, 403)."""

    model_config = ConfigDict(extra="forbid")

    case: ChaosCase
    environment: Environment = "sandbox"


class ChaosResult(_Result):
    """Whether the engine kept deciding with its last good bundle, and what was measured."""

    case: ChaosCase
    environment: Environment
    kept_deciding: bool
    figures: dict[str, Any]
