"""Admission's NATS request routes: ``mc.rpc.admission.admit`` and ``mc.rpc.admission.policies``."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs import diffing
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
    CanaryPlan,
    Environment,
)
from libs.contracts.subjects import events_filter
from libs.errors import InvalidInput
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import Headers, RpcServer
from libs.policy_bundles import MAX_ARCHIVE_BYTES, BundleTooLarge
from services.policy_admission.agent_registry import AgentRegistry, agent_routes
from services.policy_admission.diffs import Diffs, acknowledgements_view
from services.policy_admission.domain import AdmitRequest
from services.policy_admission.drift_handlers import DriftWatch
from services.policy_admission.freeze_handlers import Freezes
from services.policy_admission.handlers import AdmissionHandler
from services.policy_admission.hook_handler import HookHandler
from services.policy_admission.hooks import HookActor, HookContext, parse_hook
from services.policy_admission.listing import (
    DEFAULT_LIMIT,
    MAX_CURSOR,
    MAX_LIMIT,
    Page,
    decode_cursor,
)
from services.policy_admission.promotion_handlers import promotion_routes
from services.policy_admission.simulation_jobs import (
    SIMULATION_ID_PATTERN,
    SimulationJobs,
    SimulationRequest,
)
from services.policy_admission.tenant_bundles import TenantPolicies

RPC_SERVICE = "admission"
STEPS_DURABLE = "admission-steps"
INCIDENTS_DURABLE = "admission-incidents"


def steps_consumer_spec(durable: str = STEPS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of ``run.step_recorded`` that judges marked steps (tests narrow
    durable and tenant)."""
    return ConsumerSpec(
        durable=durable, filter_subjects=(events_filter("run.step_recorded", tenant_id),)
    )


def incidents_consumer_spec(durable: str = INCIDENTS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of incident openings and resolutions that keeps the promotion
    freeze (tests narrow durable and tenant)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(
            events_filter("incident.opened", tenant_id),
            events_filter("incident.resolved", tenant_id),
        ),
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
    by name, not by schema), as a canary (``canary``: its plan, else the default one) or for
    every run at once (``immediate``)."""

    environment: Environment = DEFAULT_ENVIRONMENT
    bundle_digest: str | None = Field(default=None, pattern=BUNDLE_DIGEST_PATTERN)
    canary: CanaryPlan | None = None
    immediate: bool = False


RELOAD_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class ReloadCall(_Call):
    """``get_reload``."""

    reload_id: str = Field(pattern=RELOAD_ID_PATTERN)


class EndCanaryCall(_Admin):
    """``end_canary``: promote the candidate to every run, or abort (roll back)."""

    reload_id: str = Field(pattern=RELOAD_ID_PATTERN)
    outcome: Literal["promoted", "rolled_back"]
    reason: str | None = Field(default=None, max_length=MAX_REASON)


class ListReloadsCall(_Call):
    """``list_reloads``: of one environment, or both."""

    environment: Environment | None = None


class ChaosCall(_Admin):
    """``run_chaos``: one case, in a non-production environment."""

    environment: Environment = "sandbox"
    case: Literal["partial_reload_failure", "conflicting_policies", "expiry_storm", "agent_load"]


class CreateWebhookCall(_Admin):
    """``create_webhook``."""

    url: str = Field(min_length=1, max_length=2000)


class WebhookCall(_Call):
    """``delete_webhook``."""

    webhook_id: str = Field(pattern=RELOAD_ID_PATTERN)


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


class OverrideFreezeCall(_Admin):
    """``override_freeze``: let promotions into ``environment`` through despite its open
    incidents."""

    environment: Environment
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class AcknowledgeDriftCall(_Admin):
    """``acknowledge_drift``: accept the drift on record (the one ``fingerprint`` names, when
    given)."""

    fingerprint: str | None = Field(default=None, pattern=BUNDLE_DIGEST_PATTERN)
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class AlignDriftCall(_Admin):
    """``align_drift``: make the other environment decide with ``source``'s bundle."""

    source: Environment


class _Listing(_Call):
    """A page of a listing, newest first: ``cursor`` is the previous page's ``next_cursor``."""

    cursor: str | None = Field(default=None, min_length=1, max_length=MAX_CURSOR)
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)

    def page(self, what: str, key_pattern: str) -> Page:
        """Where the page starts and its size; a cursor this service did not make is a 422."""
        after = decode_cursor(self.cursor, what, key_pattern) if self.cursor else None
        return Page(after=after, limit=self.limit)


class ListExceptionsCall(_Call):
    """``list_exceptions``: all of them, or those of one status."""

    status: Literal["open", "expired", "revoked"] | None = None


FieldName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
DIFF_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
DiffHash = Annotated[str, StringConstraints(pattern=DIFF_HASH_PATTERN)]


class _Page(_Call):
    limit: int = Field(default=diffing.DEFAULT_LIMIT, ge=1, le=diffing.MAX_LIMIT)
    view: diffing.View = "structured"


class CreateDiffCall(_Page):
    """``create_diff``: two bundle digests of the tenant, or two JSON documents (agent specs),
    with the fields held locked or enforced; ``actor`` is recorded as who asked for it."""

    actor: Actor = "service:gateway"
    kind: Literal["bundles", "documents"]
    old_digest: str | None = Field(default=None, pattern=BUNDLE_DIGEST_PATTERN)
    new_digest: str | None = Field(default=None, pattern=BUNDLE_DIGEST_PATTERN)
    old: Any = None
    new: Any = None
    locked_fields: list[FieldName] = Field(default_factory=list, max_length=diffing.MAX_FIELDS)
    enforced_fields: list[FieldName] = Field(default_factory=list, max_length=diffing.MAX_FIELDS)

    def request(self) -> dict[str, Any]:
        """What the diff is computed from (kept by its hash)."""
        if self.kind == "bundles":
            if self.old_digest is None or self.new_digest is None:
                raise InvalidInput("diff_inputs_invalid: name old_digest and new_digest")
            return {
                "kind": "bundles",
                "old_digest": self.old_digest,
                "new_digest": self.new_digest,
                "locked_fields": sorted(set(self.locked_fields)),
            }
        return {
            "kind": "documents",
            "old": self.old,
            "new": self.new,
            "locked_fields": sorted(set(self.locked_fields)),
            "enforced_fields": sorted(set(self.enforced_fields)),
        }


class ListDiffsCall(_Listing):
    """``list_diffs``: the tenant's diffs, the most recently asked for first."""


class GetDiffCall(_Page):
    """``get_diff``: a page of a diff's rows."""

    diff_hash: DiffHash
    cursor: str | None = Field(default=None, max_length=64)


class AcknowledgeDiffCall(_Admin):
    """``acknowledge_diff``: the caller viewed the diff."""

    diff_hash: DiffHash


class DiffAcknowledgementsCall(_Call):
    """``diff_acknowledgements``: who acknowledged the diff."""

    diff_hash: DiffHash


def diff_routes(server: RpcServer, diffs: Diffs) -> None:
    """The diff requests (``docs/policies.md``, "Diffs")."""

    @server.handler("create_diff")
    async def create_diff(body: CreateDiffCall) -> dict[str, Any]:
        """Compute a diff; its hash, summary and first page."""
        return await diffs.create(
            body.tenant_id, body.request(), body.actor, limit=body.limit, view=body.view
        )

    @server.handler("list_diffs")
    async def list_diffs(body: ListDiffsCall) -> dict[str, Any]:
        """The tenant's diffs without their rows, the most recently asked for first."""
        return await diffs.listing(body.tenant_id, body.page("diffs", DIFF_HASH_PATTERN))

    @server.handler("get_diff")
    async def get_diff(body: GetDiffCall) -> dict[str, Any]:
        """A page of a diff's rows, from ``cursor``."""
        return await diffs.get(
            body.tenant_id, body.diff_hash, cursor=body.cursor, limit=body.limit, view=body.view
        )

    @server.handler("acknowledge_diff")
    async def acknowledge_diff(body: AcknowledgeDiffCall) -> dict[str, Any]:
        """Record that the caller viewed the diff."""
        return await diffs.acknowledge(body.tenant_id, body.diff_hash, body.actor, utcnow())

    @server.handler("diff_acknowledgements")
    async def diff_acknowledgements(body: DiffAcknowledgementsCall) -> dict[str, Any]:
        """Who acknowledged the diff, and when (for promotions to require it)."""
        state = await diffs.acknowledgements(body.tenant_id, body.diff_hash)
        return acknowledgements_view(body.diff_hash, state)


class StartSimulationCall(_Admin, SimulationRequest):
    """``start_simulation``: a candidate bundle on the decisions of a time window."""


class GetSimulationCall(_Call):
    """``get_simulation``: a job's status, progress and report (``format`` csv adds it as CSV)."""

    simulation_id: str = Field(min_length=1, max_length=100)
    format: Literal["json", "csv"] = "json"


class ListSimulationsCall(_Listing):
    """``list_simulations``: the tenant's jobs, newest first, of one ``status`` or all."""

    status: Literal["queued", "running", "done", "failed"] | None = None


def simulation_routes(server: RpcServer, jobs: SimulationJobs) -> None:
    """Policy simulations (``docs/policies.md``, "Simulation")."""

    @server.handler("start_simulation")
    async def start_simulation(body: StartSimulationCall) -> dict[str, Any]:
        """Start simulating a candidate bundle on past decisions; the job (queued)."""
        request = SimulationRequest.model_validate(body.model_dump(exclude={"tenant_id", "actor"}))
        return await jobs.start(body.tenant_id, request, body.actor)

    @server.handler("get_simulation")
    async def get_simulation(body: GetSimulationCall) -> dict[str, Any]:
        """A simulation's status and progress, and its report once done."""
        return await jobs.get(body.tenant_id, body.simulation_id, body.format)

    @server.handler("list_simulations")
    async def list_simulations(body: ListSimulationsCall) -> dict[str, Any]:
        """The tenant's simulations without their reports, newest first."""
        page = body.page("simulations", SIMULATION_ID_PATTERN)
        return await jobs.listing(body.tenant_id, body.status, page)


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
            body.tenant_id,
            body.environment,
            body.bundle_digest,
            body.actor,
            canary=body.canary,
            immediate=body.immediate,
        )

    @server.handler("list_reloads")
    async def list_reloads(body: ListReloadsCall) -> dict[str, Any]:
        """Every reload of the tenant, newest first, each with its impact report."""
        return await tenants.list_reloads(body.tenant_id, body.environment)

    @server.handler("get_reload")
    async def get_reload(body: ReloadCall) -> dict[str, Any]:
        """One reload's impact report (live figures while its canary runs)."""
        return await tenants.get_reload(body.tenant_id, body.reload_id)

    @server.handler("end_canary")
    async def end_canary(body: EndCanaryCall) -> dict[str, Any]:
        """Promote or abort a canary in progress."""
        return await tenants.end_canary(
            body.tenant_id, body.reload_id, body.outcome, body.reason, body.actor
        )

    @server.handler("run_chaos")
    async def run_chaos(body: ChaosCall) -> dict[str, Any]:
        """Run a chaos case beside the tenant's bundle (non-production only)."""
        return await tenants.run_chaos(body.tenant_id, body.environment, body.case, body.actor)

    @server.handler("create_webhook")
    async def create_webhook(body: CreateWebhookCall) -> dict[str, Any]:
        """Subscribe a URL to reload outcomes; the answer shows the signing secret once."""
        return await tenants.webhooks.create(body.tenant_id, body.url, body.actor)

    @server.handler("list_webhooks")
    async def list_webhooks(body: _Call) -> dict[str, Any]:
        """The tenant's webhook subscriptions (without secrets) and their deliveries."""
        return await tenants.webhooks.listing(body.tenant_id)

    @server.handler("delete_webhook")
    async def delete_webhook(body: WebhookCall) -> dict[str, Any]:
        """Unsubscribe (its undelivered reports are dropped)."""
        return await tenants.webhooks.delete(body.tenant_id, body.webhook_id)

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


def freeze_routes(server: RpcServer, freezes: Freezes) -> None:
    """The promotion freeze's requests."""

    @server.handler("freeze_status")
    async def freeze_status(body: _Call) -> dict[str, Any]:
        """Each environment's freeze: frozen or not, its incidents and its overrides."""
        return await freezes.status(body.tenant_id)

    @server.handler("override_freeze")
    async def override_freeze(body: OverrideFreezeCall) -> dict[str, Any]:
        """Let promotions through despite the incidents freezing them now (audited)."""
        return await freezes.override(body.tenant_id, body.environment, body.reason, body.actor)


def drift_routes(server: RpcServer, watch: DriftWatch) -> None:
    """Policy drift's requests."""

    @server.handler("drift_status")
    async def drift_status(body: _Call) -> dict[str, Any]:
        """Sandbox and production compared now, and the drift on record."""
        return await watch.status(body.tenant_id)

    @server.handler("check_drift")
    async def check_drift(body: _Admin) -> dict[str, Any]:
        """Compare and record now."""
        return await watch.check_now(body.tenant_id, body.actor)

    @server.handler("acknowledge_drift")
    async def acknowledge_drift(body: AcknowledgeDriftCall) -> dict[str, Any]:
        """Accept the drift on record with a reason (audited); it no longer blocks promotions."""
        return await watch.acknowledge(body.tenant_id, body.fingerprint, body.reason, body.actor)

    @server.handler("align_drift")
    async def align_drift(body: AlignDriftCall) -> dict[str, Any]:
        """Activate ``source``'s bundle in the other environment, then compare again."""
        return await watch.align(body.tenant_id, body.source, body.actor)


def rpc_server(
    nc: NATS,
    handler: AdmissionHandler,
    tenants: TenantPolicies | None = None,
    freezes: Freezes | None = None,
    drift: DriftWatch | None = None,
    jobs: SimulationJobs | None = None,
) -> RpcServer:
    """An (unstarted) RPC server routing ``admit`` and ``policies`` to ``handler`` (and, with
    ``tenants``, the bundle, key and settings requests; with ``freezes``, ``drift`` and ``jobs``
    (the simulations), theirs)."""
    server = RpcServer(nc, RPC_SERVICE)
    if tenants is not None:
        bundle_routes(server, tenants)
        diff_routes(server, Diffs(tenants.store, tenants.read_archive))
        registry = AgentRegistry(tenants)
        agent_routes(server, registry, freezes, drift)
        promotion_routes(server, registry, freezes, drift)
    if freezes is not None:
        freeze_routes(server, freezes)
    if drift is not None:
        drift_routes(server, drift)
    if jobs is not None:
        simulation_routes(server, jobs)

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
