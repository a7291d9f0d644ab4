"""Tenants' signed bundles, signing keys and settings: what is recorded, and what every replica
decides with.

Streams (category ``policy``, one set per tenant):

* ``<t>/policy/signing-keys``: ``policy.signing_key_registered`` / ``_retired``;
* ``<t>/policy/bundles-<environment>``: ``policy.bundle_uploaded`` and
  ``policy.bundle_activated`` (by digest) for ``sandbox`` and ``production``, and each reload's
  ``policy.canary_started`` and outcome (``policy.canary_promoted`` /
  ``policy.canary_rolled_back``, see :mod:`services.policy_admission.canary`);
* ``<t>/policy/settings``: ``policy.settings_changed`` (the stream version is the settings'
  ``version``);
* ``<t>/policy/exceptions``: ``policy.exception_granted`` / ``_revoked`` / ``_expired`` (see
  :mod:`services.policy_admission.exceptions`).

The archives live in ``policy_admission.bundle_archives`` keyed by (tenant, digest). Every
activation and settings change also adds a row to ``policy_admission.changes`` in its
transaction; each replica polls that log (one indexed query every :data:`FOLLOW_INTERVAL_S`),
re-reads the tenant's streams, loads and verifies the archive again, compiles it off the event
loop and swaps the tenant's entry in one assignment. A decision looks its bundle and settings up
in memory: no I/O is added to admission, and a decision never sees a half-loaded bundle.

**Revision order.** A manifest ``revision`` is dot-separated integers, compared component by
component (``9 < 10``, ``1.9 < 1.10``). Within a tenant and environment every activation must
carry a revision strictly greater than every revision activated there before; an upload at or
below that revision is refused too. Going back to older policies means signing them again under
a newer revision, so a captured old archive can never be replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from libs import policy_bundles as artifacts
from libs.contracts import new_uuid7, stream_id_for, utcnow
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PolicyBundleActivated,
    PolicyBundleUploaded,
    PolicyCanaryPromoted,
    PolicyCanaryRolledBack,
    PolicyCanaryStarted,
    PolicyChaosRan,
    PolicyInfo,
    PolicySettingsChanged,
    PolicySigningKeyRegistered,
    PolicySigningKeyRetired,
)
from libs.contracts.policy import (
    ENVIRONMENTS,
    CanaryPlan,
    Environment,
    PolicySettings,
    policy_set_hash,
)
from libs.errors import Conflict, Forbidden, InvalidInput, MissionControlError, NotFound
from libs.eventbus.db import transaction
from libs.eventbus.repository import Aggregate, EventMeta, Recorded, Repository, begin
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork
from libs.policy_bundles import BundleConflict, BundleNotFound, BundleRejected
from libs.redaction import redact_text
from services.policy_admission import canary as canaries
from services.policy_admission import chaos
from services.policy_admission import exceptions as waivers
from services.policy_admission.agents import AgentGate
from services.policy_admission.bundle import BundleError, PolicyBundle
from services.policy_admission.rego_tests import run_sources
from services.policy_admission.webhooks import Webhooks

log = structlog.get_logger("policy_admission")

ACTOR = "service:policy-admission"
POLICY_CATEGORY = "policy"
KEYS_ENTITY = "signing-keys"
SETTINGS_ENTITY = "settings"
CHANGES_LOCK = "policy_admission.changes"
FOLLOW_INTERVAL_S = 0.25
MAX_KEYS = 100
MAX_FAILURES_SHOWN = 5


def bundles_entity(environment: str) -> str:
    """The entity id of a tenant's bundles in ``environment``."""
    return f"bundles-{environment}"


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One registered key; ``retired`` once it may sign no more."""

    key_id: str
    public_key: str
    fingerprint: str
    retired: bool = False


@dataclass(frozen=True)
class Keys:
    """A tenant's signing keys, by id (retired ones kept: their ids are never reused)."""

    keys: tuple[SigningKey, ...] = ()

    def get(self, key_id: str) -> SigningKey | None:
        """The key with ``key_id``, retired or not."""
        return next((k for k in self.keys if k.key_id == key_id), None)

    def active(self) -> dict[str, str]:
        """key id → PEM of the keys that may sign."""
        return {k.key_id: k.public_key for k in self.keys if not k.retired}


def _fold_keys(state: Keys, recorded: Sequence[Recorded]) -> Keys:
    keys = list(state.keys)
    for r in recorded:
        e = r.event
        if isinstance(e, PolicySigningKeyRegistered):
            keys.append(SigningKey(e.key_id, e.public_key, e.fingerprint))
        elif isinstance(e, PolicySigningKeyRetired):
            keys = [replace(k, retired=True) if k.key_id == e.key_id else k for k in keys]
    return Keys(tuple(keys))


@dataclass(frozen=True)
class Uploaded:
    """A stored bundle of one environment."""

    digest: str
    revision: str
    signer_key_id: str
    policies: tuple[PolicyInfo, ...]


@dataclass(frozen=True)
class Canary:
    """A reload still in its canary: ``candidate`` decides for ``plan.percent`` % of runs,
    ``stable`` (``None``: the repository's bundle) for the rest."""

    reload_id: str
    plan: CanaryPlan
    candidate: PolicyBundleActivated
    stable: PolicyBundleActivated | None
    started_at: datetime


@dataclass(frozen=True)
class Reload:
    """One activation and what became of it (its impact report without live figures)."""

    reload_id: str
    environment: str
    bundle_digest: str
    revision: str | None
    stable_digest: str
    plan: dict[str, Any] | None
    started_at: datetime
    started_by: str
    status: str = "canary"
    reason: str | None = None
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    ended_at: datetime | None = None
    ended_by: str | None = None


@dataclass(frozen=True)
class Bundles:
    """A tenant's bundles in one environment: uploaded, the active one (during a canary: the
    candidate), the highest revision ever activated, the canary in progress and every reload."""

    uploaded: dict[str, Uploaded] = field(default_factory=dict)
    active: PolicyBundleActivated | None = None
    highest: tuple[int, ...] | None = None
    prior: PolicyBundleActivated | None = None
    canary: Canary | None = None
    reloads: dict[str, Reload] = field(default_factory=dict)

    @property
    def stable(self) -> PolicyBundleActivated | None:
        """What decides for the runs outside a canary (``None``: the repository's bundle)."""
        return self.canary.stable if self.canary is not None else self.active


def _fold_bundles(state: Bundles, recorded: Sequence[Recorded]) -> Bundles:
    uploaded, active, highest = dict(state.uploaded), state.active, state.highest
    prior, canary, reloads = state.prior, state.canary, dict(state.reloads)
    for r in recorded:
        e = r.event
        at = r.envelope.occurred_at
        if isinstance(e, PolicyBundleUploaded):
            uploaded[e.bundle_digest] = Uploaded(
                e.bundle_digest, e.revision, e.signer_key_id, tuple(e.policies)
            )
        elif isinstance(e, PolicyBundleActivated):
            prior, active = active, e
            if e.revision is not None:
                key = artifacts.revision_key(e.revision)
                highest = key if highest is None else max(highest, key)
        elif isinstance(e, PolicyCanaryStarted) and active is not None:
            canary = Canary(e.reload_id, CanaryPlan.model_validate(e.plan), active, prior, at)
            reloads[e.reload_id] = Reload(
                e.reload_id, e.environment, e.bundle_digest, e.revision, e.stable_digest,
                e.plan, at, e.by,
            )  # fmt: skip
        elif isinstance(e, PolicyCanaryPromoted | PolicyCanaryRolledBack):
            if isinstance(e, PolicyCanaryRolledBack) and canary and canary.reload_id == e.reload_id:
                active, prior = canary.stable, None
            if canary is not None and canary.reload_id == e.reload_id:
                canary = None
            started = reloads.get(e.reload_id) or Reload(
                e.reload_id, e.environment, e.bundle_digest,
                active.revision if active is not None else None, e.stable_digest
                if isinstance(e, PolicyCanaryPromoted) else e.restored_digest, None, at, e.by,
            )  # fmt: skip
            reloads[e.reload_id] = replace(
                started,
                status="promoted" if isinstance(e, PolicyCanaryPromoted) else "rolled_back",
                reason=e.reason,
                detail=getattr(e, "detail", ""),
                figures=dict(e.figures),
                ended_at=at,
                ended_by=e.by,
            )
    return Bundles(uploaded, active, highest, prior, canary, reloads)


@dataclass(frozen=True)
class Settings:
    """A tenant's settings and their version (0: never set)."""

    version: int = 0
    settings: PolicySettings | None = None


def _fold_settings(state: Settings, recorded: Sequence[Recorded]) -> Settings:
    for r in recorded:
        if isinstance(r.event, PolicySettingsChanged):
            state = Settings(r.event.version, PolicySettings.model_validate(r.event.settings))
    return state


def _count(state: int, recorded: Sequence[Recorded]) -> int:
    return state + len(recorded)


CHAOS = Aggregate[int](category=POLICY_CATEGORY, initial=lambda t, i: 0, fold=_count)
"""``<t>/policy/chaos``: the chaos cases run (``policy.chaos_ran``)."""
CHAOS_ENTITY = "chaos"

KEYS = Aggregate[Keys](category=POLICY_CATEGORY, initial=lambda t, i: Keys(), fold=_fold_keys)
BUNDLES = Aggregate[Bundles](
    category=POLICY_CATEGORY, initial=lambda t, i: Bundles(), fold=_fold_bundles
)
SETTINGS = Aggregate[Settings](
    category=POLICY_CATEGORY, initial=lambda t, i: Settings(), fold=_fold_settings
)


# --- decisions on the streams (pure) -------------------------------------------------------------


def register_key(state: Keys, key_id: str, public_key: str) -> list[DomainEvent]:
    """Register ``key_id``; the same key again is a no-op, another key under a used id (or a
    retired one) is ``signing_key_conflict``."""
    fingerprint = artifacts.key_fingerprint(public_key)
    existing = state.get(key_id)
    if existing is not None:
        if existing.retired:
            raise BundleConflict(
                "signing_key_conflict", f"key {key_id!r} was retired; use a new key id"
            )
        if existing.fingerprint != fingerprint:
            raise BundleConflict(
                "signing_key_conflict", f"key id {key_id!r} is registered with another key"
            )
        return []
    if len(state.keys) >= MAX_KEYS:
        raise BundleConflict("signing_key_conflict", f"a tenant may hold at most {MAX_KEYS} keys")
    return [
        PolicySigningKeyRegistered(
            key_id=key_id,
            public_key=artifacts.public_pem(artifacts.load_public_key(public_key)),
            fingerprint=fingerprint,
        )
    ]


def retire_key(state: Keys, key_id: str, reason: str | None) -> list[DomainEvent]:
    """Retire ``key_id`` (again: no-op); an unknown id is 404 ``signing_key_not_found``."""
    existing = state.get(key_id)
    if existing is None:
        raise BundleNotFound("signing_key_not_found", f"no signing key {key_id!r}")
    if existing.retired:
        return []
    return [PolicySigningKeyRetired(key_id=key_id, reason=reason)]


def check_signer(keys: Keys, key_id: str) -> str:
    """The PEM of ``key_id`` if it may sign: ``bundle_key_retired`` or ``bundle_key_unknown``."""
    key = keys.get(key_id)
    if key is None:
        raise BundleRejected(
            "bundle_key_unknown", f"key {key_id!r} is not a signing key of this tenant"
        )
    if key.retired:
        raise BundleRejected("bundle_key_retired", f"key {key_id!r} was retired")
    return key.public_key


def check_revision(state: Bundles, revision: str, environment: str) -> None:
    """``bundle_revision_replayed`` unless ``revision`` is above every one activated."""
    if state.highest is not None and artifacts.revision_key(revision) <= state.highest:
        raise BundleConflict(
            "bundle_revision_replayed",
            f"revision {revision!r} is not newer than the newest revision activated in "
            f"{environment} ({'.'.join(map(str, state.highest))}); sign the bundle again with a "
            "higher revision",
        )


def record_upload(
    state: Bundles, checked: CheckedBundle, environment: Environment, size: int
) -> list[DomainEvent]:
    """``policy.bundle_uploaded`` unless this digest was uploaded here already."""
    check_revision(state, checked.revision, environment)
    if checked.digest in state.uploaded:
        return []
    return [
        PolicyBundleUploaded(
            bundle_digest=checked.digest,
            environment=environment,
            revision=checked.revision,
            signer_key_id=checked.signer_key_id,
            size_bytes=size,
            files=checked.files,
            policies=list(checked.bundle.policies),
        )
    ]


def record_activation(
    state: Bundles, checked: CheckedBundle, environment: Environment, public_key: str
) -> list[DomainEvent]:
    """``policy.bundle_activated`` for ``checked`` (nothing if it is already the active one)."""
    if checked.digest not in state.uploaded:
        raise BundleNotFound(
            "bundle_not_found", f"no bundle {checked.digest} was uploaded to {environment}"
        )
    if state.active is not None and state.active.bundle_digest == checked.digest:
        return []
    check_revision(state, checked.revision, environment)
    return [
        PolicyBundleActivated(
            bundle_digest=checked.digest,
            policies=list(checked.bundle.policies),
            environment=environment,
            revision=checked.revision,
            signer_key_id=checked.signer_key_id,
            signer_public_key=public_key,
        )
    ]


def record_reload(
    state: Bundles,
    checked: CheckedBundle,
    environment: Environment,
    public_key: str,
    *,
    reload_id: str,
    plan: CanaryPlan | None,
    default_digest: str,
    actor: str,
) -> list[DomainEvent]:
    """An activation and its reload: ``policy.canary_started`` with ``plan``, or (``plan``
    ``None``: at once) ``policy.canary_promoted`` with reason ``immediate``. Nothing if the
    digest is already active; ``canary_in_progress`` (409) while another reload is a canary."""
    if state.active is not None and state.active.bundle_digest == checked.digest:
        return []
    if state.canary is not None:
        raise BundleConflict(
            "canary_in_progress",
            f"reload {state.canary.reload_id} of {state.canary.candidate.bundle_digest} is still "
            f"a canary in {environment}; promote or abort it first",
        )
    events = record_activation(state, checked, environment, public_key)
    if not events:  # pragma: no cover - the digest is not active (checked above)
        return []
    stable = state.active
    stable_digest = stable.bundle_digest if stable is not None else default_digest
    if plan is None:
        return [
            *events,
            PolicyCanaryPromoted(
                reload_id=reload_id,
                environment=environment,
                bundle_digest=checked.digest,
                stable_digest=stable_digest,
                reason="immediate",
                by=actor,
            ),
        ]
    return [
        *events,
        PolicyCanaryStarted(
            reload_id=reload_id,
            environment=environment,
            bundle_digest=checked.digest,
            revision=checked.revision,
            stable_digest=stable_digest,
            stable_source="tenant" if stable is not None else "default",
            plan=plan.model_dump(mode="json"),
            by=actor,
        ),
    ]


def finish_canary(
    state: Bundles,
    reload_id: str,
    verdict: canaries.Verdict,
    *,
    default_digest: str,
    actor: str,
    strict: bool,
) -> list[DomainEvent]:
    """The outcome of the canary ``reload_id``. Not in progress: nothing (``strict``: 404
    ``reload_not_found`` or 409 ``canary_not_in_progress``)."""
    canary = state.canary
    if canary is None or canary.reload_id != reload_id:
        if not strict:
            return []
        done = state.reloads.get(reload_id)
        if done is None:
            raise BundleNotFound("reload_not_found", f"no reload {reload_id!r}")
        raise BundleConflict(
            "canary_not_in_progress", f"reload {reload_id} is already {done.status}"
        )
    env = canary.candidate.environment
    stable_digest = canary.stable.bundle_digest if canary.stable is not None else default_digest
    if verdict.outcome == "promoted":
        return [
            PolicyCanaryPromoted(
                reload_id=reload_id,
                environment=env,
                bundle_digest=canary.candidate.bundle_digest,
                stable_digest=stable_digest,
                reason=verdict.reason,
                by=actor,
                figures=verdict.figures,
            )
        ]
    return [
        PolicyCanaryRolledBack(
            reload_id=reload_id,
            environment=env,
            bundle_digest=canary.candidate.bundle_digest,
            restored_digest=stable_digest,
            reason=verdict.reason,
            detail=verdict.detail,
            by=actor,
            figures=verdict.figures,
        )
    ]


def reload_document(reload: Reload, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """A reload's impact report: what was tried against what, the plan, the figures (live ones
    for a canary in progress) and the outcome."""
    return {
        "reload_id": reload.reload_id,
        "environment": reload.environment,
        "bundle_digest": reload.bundle_digest,
        "revision": reload.revision,
        "stable_digest": reload.stable_digest,
        "plan": reload.plan,
        "status": reload.status,
        "reason": reload.reason,
        "detail": reload.detail,
        "figures": figures if figures is not None else reload.figures,
        "started_at": reload.started_at.isoformat(),
        "started_by": reload.started_by,
        "ended_at": reload.ended_at.isoformat() if reload.ended_at is not None else None,
        "ended_by": reload.ended_by,
    }


def change_settings(
    state: Settings, settings: PolicySettings, expected_version: int | None
) -> list[DomainEvent]:
    """The next settings version; ``settings_version_conflict`` if ``expected_version`` is not
    the current one."""
    if expected_version is not None and expected_version != state.version:
        raise Conflict(
            f"settings_version_conflict: the settings are at version {state.version}, not "
            f"{expected_version}; read them again and retry"
        )
    return [
        PolicySettingsChanged(
            version=state.version + 1, settings=settings.model_dump(mode="json", exclude_none=True)
        )
    ]


# --- checking an archive -------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedBundle:
    """An archive that passed every check: verified, compiled, its own tests green."""

    digest: str
    revision: str
    signer_key_id: str
    files: int
    bundle: PolicyBundle


def check_archive(
    archive: bytes, public_keys: Mapping[str, str], *, run_tests: bool = True
) -> CheckedBundle:
    """Extract, verify against ``public_keys`` (active key id → PEM), compile, and (at upload)
    run the bundle's tests. CPU only; run it off the event loop (:func:`asyncio.to_thread`).

    The tests run once, at upload, before the archive may be activated: an archive is
    content-addressed, so what passed then is what an activation or a replica loads later
    (each verifies the signature and compiles again, which takes milliseconds; the tests take
    seconds).

    Refusals: those of :func:`~services.policy_admission.artifacts.extract` and
    :func:`~services.policy_admission.artifacts.verify`, ``bundle_manifest_invalid``,
    ``bundle_compile_failed`` and ``bundle_tests_failed``.
    """
    digest = artifacts.archive_digest(archive)
    files = artifacts.extract(archive)
    signed = artifacts.verify(files, public_keys)
    revision = artifacts.manifest_revision(files)
    modules, tests = artifacts.content_of(files)
    try:
        bundle = PolicyBundle(Path(f"bundle:{digest}"), modules, digest=digest)
    except BundleError as exc:
        raise BundleRejected("bundle_compile_failed", str(exc)) from None
    if not run_tests:
        return CheckedBundle(digest, revision, signed.key_id, len(files), bundle)
    data_json = modules[-1][1]
    results = run_sources(modules[:-1] + tests, tests, data_json)
    failed = [r for r in results if not r.passed]
    if failed:
        shown = "; ".join(f"{r.test.name}: {r.detail[:200]}" for r in failed[:MAX_FAILURES_SHOWN])
        raise BundleRejected(
            "bundle_tests_failed", f"{len(failed)} of {len(results)} bundle tests failed: {shown}"
        )
    return CheckedBundle(digest, revision, signed.key_id, len(files), bundle)


# --- what a replica decides with -----------------------------------------------------------------


@dataclass(frozen=True)
class CanaryView:
    """A canary as a replica decides with it: the candidate, loaded, and who it decides for."""

    reload_id: str
    plan: CanaryPlan
    candidate: PolicyBundle
    started_at: datetime


@dataclass(frozen=True)
class Choice:
    """The bundle that decides one run's step: ``arm`` and ``reload_id`` name the canary it is
    part of (if any); ``fallback`` decides instead when the candidate fails to evaluate."""

    bundle: PolicyBundle
    arm: canaries.Arm | None = None
    reload_id: str | None = None
    fallback: PolicyBundle | None = None


@dataclass(frozen=True)
class TenantView:
    """One tenant's bundles (by environment) and settings, as loaded in this replica. During a
    canary ``bundles`` holds the stable bundle and ``canaries`` the candidate."""

    bundles: Mapping[str, PolicyBundle] = field(default_factory=dict)
    canaries: Mapping[str, CanaryView] = field(default_factory=dict)
    revisions: Mapping[str, str] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    settings_input: dict[str, Any] | None = None
    exceptions: tuple[waivers.Waiver, ...] = ()
    """The tenant's open policy exceptions (expired ones still here until swept: a decision
    compares each expiry with its own clock)."""
    agents: Mapping[str, AgentGate] = field(default_factory=dict)
    """The tenant's registered agents, by id (:mod:`services.policy_admission.agents`)."""
    policy_set_hashes: Mapping[str, str] = field(default_factory=dict)
    """Per environment, the :func:`~libs.contracts.policy.policy_set_hash` decisions use."""


class TenantPolicies:
    """The bundles and settings of every tenant that has any, in memory, kept current.

    :meth:`bundle_for` and :meth:`settings_for` are dictionary lookups (the admission hot
    path). :meth:`follow` polls the change log and reloads the tenants it names; a tenant's
    view is replaced whole, in one assignment, after its bundles are verified and compiled, so
    a decision sees the old view or the new one, never a mix.
    """

    def __init__(
        self,
        store: EventStore,
        default: PolicyBundle,
        *,
        interval_s: float = FOLLOW_INTERVAL_S,
        webhooks: Webhooks | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.default = default
        self.interval_s = interval_s
        self.webhooks = webhooks or Webhooks(store)
        self.clock = clock
        self.meter = canaries.Meter()
        self.replica_id = str(new_uuid7())
        self.keys = Repository(store, KEYS, max_retries=4)
        self.bundles = Repository(store, BUNDLES, max_retries=4)
        self.settings = Repository(store, SETTINGS, max_retries=4)
        self.exceptions = Repository(store, waivers.EXCEPTIONS, max_retries=4)
        self.chaos = Repository(store, CHAOS, max_retries=4)
        self._views: dict[str, TenantView] = {}
        self._default_set_hash = policy_set_hash(default.digest, None, ())
        self._seen = 0
        self._reloads: dict[str, asyncio.Lock] = {}

    # -- the hot path --------------------------------------------------------------------------

    def bundle_for(self, tenant_id: str, environment: str) -> PolicyBundle:
        """The bundle deciding for ``tenant_id`` in ``environment``: its own, else the
        repository's."""
        view = self._views.get(tenant_id)
        if view is None:
            return self.default
        return view.bundles.get(environment, self.default)

    def choose(self, tenant_id: str, environment: str, run_id: str) -> Choice:
        """The bundle deciding a step of ``run_id``: during a canary, the candidate for the
        runs its share holds (a stable hash of the run id: every step of a run alike), the
        stable bundle for the others."""
        view = self._views.get(tenant_id)
        if view is None:
            return Choice(self.default)
        stable = view.bundles.get(environment, self.default)
        canary = view.canaries.get(environment)
        if canary is None:
            return Choice(stable)
        if canaries.in_canary(run_id, canary.reload_id, canary.plan.percent):
            return Choice(canary.candidate, "canary", canary.reload_id, stable)
        return Choice(stable, "stable", canary.reload_id)

    def observe(
        self,
        tenant_id: str,
        choice: Choice,
        *,
        denied: bool,
        error: bool,
        seconds: float,
    ) -> None:
        """Count one evaluation made for a canary (no I/O: written out by :meth:`tend`)."""
        if choice.arm is not None and choice.reload_id is not None:
            self.meter.observe(
                tenant_id, choice.reload_id, choice.arm, denied=denied, error=error, seconds=seconds
            )

    def settings_for(self, tenant_id: str) -> dict[str, Any] | None:
        """The tenant's ``input.settings`` (``None`` when it never set any)."""
        view = self._views.get(tenant_id)
        return None if view is None else view.settings_input

    def exceptions_for(self, tenant_id: str) -> tuple[waivers.Waiver, ...]:
        """The tenant's open policy exceptions, as this replica holds them."""
        view = self._views.get(tenant_id)
        return () if view is None else view.exceptions

    def agent_gate(self, tenant_id: str, agent_id: str | None) -> AgentGate | None:
        """The registered agent ``agent_id`` as admission knows it (``None``: not registered)."""
        view = self._views.get(tenant_id)
        if view is None or not agent_id:
            return None
        return view.agents.get(agent_id)

    def policy_set_hash_for(self, tenant_id: str, environment: str) -> str:
        """The policy set hash of the tenant's bundle, settings and exceptions in
        ``environment`` (computed when the tenant's view is loaded)."""
        view = self._views.get(tenant_id)
        if view is not None and environment in view.policy_set_hashes:
            return view.policy_set_hashes[environment]
        return self._default_set_hash

    def view(self, tenant_id: str) -> TenantView:
        """What this replica holds for ``tenant_id``."""
        return self._views.get(tenant_id) or TenantView()

    def tenant_ids(self) -> list[str]:
        """The tenants with a bundle, settings or exceptions of their own (the others decide
        with the repository's bundle alone)."""
        return sorted(self._views)

    # -- following the change log --------------------------------------------------------------

    async def start(self) -> None:
        """Load every tenant with a change recorded (call before serving)."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT coalesce(max(seq), 0) AS seq FROM policy_admission.changes"
            )
            row = await cur.fetchone()
            self._seen = int(row["seq"]) if row else 0
            cur = await conn.execute("SELECT DISTINCT tenant_id FROM policy_admission.changes")
            tenants = [r["tenant_id"] for r in await cur.fetchall()]
        for tenant in tenants:
            await self.reload(tenant)

    async def poll(self) -> list[str]:
        """Reload the tenants with changes after the last seen; the tenants reloaded."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT seq, tenant_id FROM policy_admission.changes WHERE seq > %s "
                "ORDER BY seq LIMIT 1000",
                (self._seen,),
            )
            rows = await cur.fetchall()
        if not rows:
            return []
        tenants = list(dict.fromkeys(r["tenant_id"] for r in rows))
        for tenant in tenants:
            await self.reload(tenant)
        self._seen = int(rows[-1]["seq"])
        return tenants

    async def follow(self) -> None:
        """Poll until cancelled; a failed poll is logged and retried at the next tick. Each tick
        also writes this replica's canary counts and judges the canaries in progress."""
        while True:
            try:
                await self.poll()
            except Exception as exc:
                log.warning("policy_follow.poll_failed", error=redact_text(str(exc))[:500])
            try:
                await self.tend()
            except Exception as exc:
                log.warning("policy_canary.tend_failed", error=redact_text(str(exc))[:500])
            await asyncio.sleep(self.interval_s)

    async def reload(self, tenant_id: str) -> TenantView:
        """Re-read the tenant's activations and settings; load what changed; swap the view.

        An active archive that fails to load or verify keeps the bundle this replica had (or
        the repository's, if it had none) and is logged: a replica never decides with an
        archive it could not verify.
        """
        lock = self._reloads.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            old = self.view(tenant_id)
            bundles = dict(old.bundles)
            revisions = dict(old.revisions)
            candidates = dict(old.canaries)
            loaded = {b.digest: b for b in bundles.values()}
            loaded.update({c.candidate.digest: c.candidate for c in candidates.values()})
            for env in ENVIRONMENTS:
                state = await self.bundles.load(tenant_id, bundles_entity(env))
                stable, canary = state.stable, state.canary
                if stable is None:
                    bundles.pop(env, None)  # back to the repository's (a first canary undone)
                    revisions.pop(env, None)
                else:
                    bundle = await self._bundle(tenant_id, stable, loaded)
                    if bundle is not None:
                        bundles[env] = bundle
                        revisions[env] = stable.revision or ""
                if canary is None:
                    candidates.pop(env, None)
                    continue
                candidate = await self._bundle(tenant_id, canary.candidate, loaded)
                if candidate is None:
                    candidates.pop(env, None)  # this replica decides with the stable one
                else:
                    candidates[env] = CanaryView(
                        canary.reload_id, canary.plan, candidate, canary.started_at
                    )
            settings = await self.settings.load(tenant_id, SETTINGS_ENTITY)
            granted = await self.exceptions.load(tenant_id, waivers.EXCEPTIONS_ENTITY)
            settings_input = settings.settings.as_input() if settings.settings is not None else None
            open_waivers = granted.open()
            view = TenantView(
                bundles=bundles,
                canaries=candidates,
                revisions=revisions,
                settings=settings,
                settings_input=settings_input,
                exceptions=open_waivers,
                agents=await load_gates(self.store, tenant_id),
                policy_set_hashes={
                    env: policy_set_hash(
                        bundles.get(env, self.default).digest,
                        settings_input,
                        (w.exception_id for w in open_waivers),
                    )
                    for env in ENVIRONMENTS
                },
            )
            self._views[tenant_id] = view  # the swap: one assignment
            return view

    async def _bundle(
        self, tenant_id: str, active: PolicyBundleActivated, loaded: dict[str, PolicyBundle]
    ) -> PolicyBundle | None:
        """The bundle of ``active``: already loaded, or loaded now (``None``, logged, if it fails
        to load or verify)."""
        if active.bundle_digest in loaded:
            return loaded[active.bundle_digest]
        try:
            bundle = await self._load_active(tenant_id, active)
        except Exception as exc:
            log.error(
                "policy_bundle.load_failed",
                tenant_id=tenant_id,
                environment=active.environment,
                bundle_digest=active.bundle_digest,
                error=redact_text(str(exc))[:500],
            )
            return None
        loaded[bundle.digest] = bundle
        return bundle

    async def _load_active(self, tenant_id: str, active: PolicyBundleActivated) -> PolicyBundle:
        archive = await self.read_archive(tenant_id, active.bundle_digest)
        if active.signer_key_id is None or active.signer_public_key is None:
            raise BundleRejected("bundle_unsigned", "the activation names no signing key")
        keys = {active.signer_key_id: active.signer_public_key}
        started = time.perf_counter()
        checked = await asyncio.to_thread(check_archive, archive, keys, run_tests=False)
        if checked.digest != active.bundle_digest:  # pragma: no cover - content-addressed
            raise BundleRejected("bundle_file_tampered", "the stored archive changed")
        log.info(
            "policy_bundle.loaded",
            tenant_id=tenant_id,
            environment=active.environment,
            bundle_digest=checked.digest,
            revision=checked.revision,
            seconds=round(time.perf_counter() - started, 4),
        )
        return checked.bundle

    async def read_archive(self, tenant_id: str, digest: str) -> bytes:
        """The stored archive; ``bundle_not_found`` if there is none."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT archive FROM policy_admission.bundle_archives "
                "WHERE tenant_id = %s AND digest = %s",
                (tenant_id, digest),
            )
            row = await cur.fetchone()
        if row is None:
            raise BundleNotFound("bundle_not_found", f"no stored bundle {digest}")
        return bytes(row["archive"])

    # -- commands ------------------------------------------------------------------------------

    async def register_key(
        self, tenant_id: str, key_id: str, public_key: str, actor: str
    ) -> dict[str, Any]:
        """``PUT /v1/policy-signing-keys/{key_id}``."""
        return await self._change_keys(
            tenant_id, key_id, lambda s: register_key(s, key_id, public_key), actor
        )

    async def retire_key(
        self, tenant_id: str, key_id: str, reason: str | None, actor: str
    ) -> dict[str, Any]:
        """``POST /v1/policy-signing-keys/{key_id}:retire``."""
        return await self._change_keys(
            tenant_id, key_id, lambda s: retire_key(s, key_id, reason), actor
        )

    async def _change_keys(
        self, tenant_id: str, key_id: str, decide: Callable[[Keys], list[DomainEvent]], actor: str
    ) -> dict[str, Any]:
        _, stored = await self.keys.execute(
            tenant_id, KEYS_ENTITY, decide, EventMeta(correlation_id=key_id, actor=actor)
        )
        return await self.key_listing(tenant_id, created=bool(stored))

    async def key_listing(self, tenant_id: str, created: bool | None = None) -> dict[str, Any]:
        """The tenant's signing keys."""
        keys = await self.keys.load(tenant_id, KEYS_ENTITY)
        out: dict[str, Any] = {
            "keys": [
                {
                    "key_id": k.key_id,
                    "algorithm": artifacts.SIGNING_ALG,
                    "fingerprint": k.fingerprint,
                    "public_key": k.public_key,
                    "status": "retired" if k.retired else "active",
                }
                for k in keys.keys
            ]
        }
        if created is not None:
            out["changed"] = created
        return out

    async def upload(
        self, tenant_id: str, environment: Environment, archive: bytes, actor: str
    ) -> dict[str, Any]:
        """Verify, compile and test an archive; store it and record its upload."""
        keys = await self.keys.load(tenant_id, KEYS_ENTITY)
        checked = await asyncio.to_thread(check_archive, archive, keys.active())
        async with begin(self.store) as uow:
            check_signer(
                await self.keys.load(tenant_id, KEYS_ENTITY, uow=uow), checked.signer_key_id
            )
            _, stored = await self.bundles.execute(
                tenant_id,
                bundles_entity(environment),
                lambda s: record_upload(s, checked, environment, len(archive)),
                EventMeta(correlation_id=checked.digest, actor=actor),
                uow=uow,
            )
            await _store_archive(uow, tenant_id, checked.digest, archive)
        return _bundle_answer(checked, environment, created=bool(stored), activated=False)

    async def activate(
        self,
        tenant_id: str,
        environment: Environment,
        digest: str | None,
        actor: str,
        *,
        canary: CanaryPlan | None = None,
        immediate: bool = False,
    ) -> dict[str, Any]:
        """Activate the uploaded bundle ``digest`` (required) after verifying it again: as a
        canary (``canary``, else the default plan), or ``immediate``-ly for every run."""
        if not digest:
            raise BundleRejected(
                "bundle_reload_unpinned",
                "an activation must name the bundle's digest (sha256:<hex>)",
            )
        archive = await self.read_archive(tenant_id, digest)
        keys = await self.keys.load(tenant_id, KEYS_ENTITY)
        try:
            checked = await asyncio.to_thread(
                check_archive, archive, keys.active(), run_tests=False
            )
        except BundleRejected as exc:
            if exc.reason == "bundle_key_unknown":
                # A key that was registered and retired since the upload: say so.
                _, signed = artifacts.read_signature(artifacts.extract(archive))
                check_signer(keys, signed.key_id)
            raise
        async with begin(self.store) as uow:
            await uow.lock(CHANGES_LOCK)
            public_key = check_signer(
                await self.keys.load(tenant_id, KEYS_ENTITY, uow=uow), checked.signer_key_id
            )
            reload_id = str(new_uuid7())
            decide = partial(
                record_reload,
                checked=checked,
                environment=environment,
                public_key=public_key,
                reload_id=reload_id,
                plan=None if immediate else (canary or CanaryPlan()),
                default_digest=self.default.digest,
                actor=actor,
            )
            state, stored = await self._record(
                uow, tenant_id, environment, decide, reload_id, actor, notify=immediate
            )
        # This replica applies it at once; the others follow the change log.
        await self.reload(tenant_id)
        answer = _bundle_answer(checked, environment, created=False, activated=bool(stored))
        if stored:
            answer["reload"] = reload_document(state.reloads[reload_id])
        return answer

    # -- canaries ------------------------------------------------------------------------------

    async def tend(self) -> list[str]:
        """Write this replica's canary counts, then judge every canary in progress here; the
        reloads that ended."""
        await self.flush_counts()
        ended: list[str] = []
        for tenant_id, view in list(self._views.items()):
            for env, canary in list(view.canaries.items()):
                try:
                    if await self._tend_one(tenant_id, env, canary):
                        ended.append(canary.reload_id)
                except MissionControlError as exc:
                    # One canary that cannot be judged now (a conflict that outlived its
                    # retries, the store briefly gone) must not hold up the others; the next
                    # tick judges it again.
                    log.warning(
                        "policy_canary.judge_failed",
                        tenant_id=tenant_id,
                        environment=env,
                        reload_id=canary.reload_id,
                        error=redact_text(str(exc))[:500],
                    )
        return ended

    async def _tend_one(self, tenant_id: str, environment: str, canary: CanaryView) -> bool:
        arms = await self.counts(canary.reload_id)
        elapsed = (self.clock() - canary.started_at).total_seconds()
        verdict = canaries.judge(canary.plan, arms, elapsed)
        if verdict is None:
            return False
        return await self._finish(tenant_id, environment, canary.reload_id, verdict, ACTOR, False)

    async def flush_counts(self) -> None:
        """Write this replica's counts of the canaries that changed (absolute values)."""
        dirty, self.meter.dirty = self.meter.dirty, set()
        if not dirty:
            return
        try:
            await self._write_counts(dirty)
        except BaseException:
            self.meter.dirty |= dirty  # written again at the next tick
            raise

    async def _write_counts(self, dirty: set[str]) -> None:
        async with transaction(self.store.pool) as conn:
            for reload_id in sorted(dirty):
                tenant_id = self.meter.tenants.get(reload_id, "")
                for arm, stats in self.meter.of(reload_id).items():
                    await conn.execute(
                        "INSERT INTO policy_admission.canary_stats (reload_id, replica_id, arm, "
                        "tenant_id, decisions, denies, errors, latency) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::bigint[]) "
                        "ON CONFLICT (reload_id, replica_id, arm) DO UPDATE SET "
                        "decisions = EXCLUDED.decisions, denies = EXCLUDED.denies, "
                        "errors = EXCLUDED.errors, latency = EXCLUDED.latency, updated_at = now()",
                        (
                            reload_id,
                            self.replica_id,
                            arm,
                            tenant_id,
                            stats.decisions,
                            stats.denies,
                            stats.errors,
                            stats.latency,
                        ),
                    )

    async def counts(self, reload_id: str) -> dict[canaries.Arm, canaries.ArmStats]:
        """Every replica's counts of ``reload_id``, summed."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT arm, decisions, denies, errors, latency FROM policy_admission.canary_stats "
                "WHERE reload_id = %s",
                (reload_id,),
            )
            rows = await cur.fetchall()
        return canaries.summed(
            (
                r["arm"],
                canaries.ArmStats(
                    int(r["decisions"]), int(r["denies"]), int(r["errors"]), list(r["latency"])
                ),
            )
            for r in rows
        )

    async def _finish(
        self,
        tenant_id: str,
        environment: str,
        reload_id: str,
        verdict: canaries.Verdict,
        actor: str,
        strict: bool,
    ) -> bool:
        decide = partial(
            finish_canary,
            reload_id=reload_id,
            verdict=verdict,
            default_digest=self.default.digest,
            actor=actor,
            strict=strict,
        )
        async with begin(self.store) as uow:
            await uow.lock(CHANGES_LOCK)
            _, stored = await self._record(
                uow, tenant_id, environment, decide, reload_id, actor, notify=True
            )
        if not stored:
            return False
        log.info(
            "policy_canary.ended",
            tenant_id=tenant_id,
            environment=environment,
            reload_id=reload_id,
            outcome=verdict.outcome,
            reason=verdict.reason,
        )
        self.meter.forget(reload_id)
        await self.reload(tenant_id)
        return True

    async def _record(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        environment: str,
        decide: Callable[[Bundles], list[DomainEvent]],
        reload_id: str,
        actor: str,
        *,
        notify: bool,
    ) -> tuple[Bundles, Sequence[Any]]:
        """Record a reload's events in ``uow`` with its change-log row and (``notify``: an
        outcome) the webhook deliveries of its report."""
        state, stored = await self.bundles.execute(
            tenant_id,
            bundles_entity(environment),
            decide,
            EventMeta(correlation_id=reload_id, actor=actor),
            uow=uow,
        )
        if stored:
            await _log_change(uow, tenant_id, "activation")
            if notify:
                await self._enqueue(uow, tenant_id, state.reloads[reload_id], stored[-1])
        return state, stored

    async def _enqueue(self, uow: UnitOfWork, tenant_id: str, reload: Reload, stored: Any) -> None:
        report = {"event_type": stored.event_type, **reload_document(reload)}
        await self.webhooks.enqueue(uow, tenant_id, reload.reload_id, report["event_type"], report)

    async def end_canary(
        self, tenant_id: str, reload_id: str, outcome: str, reason: str | None, actor: str
    ) -> dict[str, Any]:
        """``POST /v1/policy-reloads/{id}:promote`` or ``:abort``: an operator ends a canary."""
        environment, _ = await self._find_reload(tenant_id, reload_id)
        await self.flush_counts()
        arms = await self.counts(reload_id)
        state = await self.bundles.load(tenant_id, bundles_entity(environment))
        started = state.canary.started_at if state.canary is not None else self.clock()
        figures = canaries.report(arms, (self.clock() - started).total_seconds())
        verdict = canaries.Verdict(
            "promoted" if outcome == "promoted" else "rolled_back",
            "operator",
            reason or "",
            figures,
        )
        await self._finish(tenant_id, environment, reload_id, verdict, actor, True)
        return await self.get_reload(tenant_id, reload_id)

    async def _find_reload(self, tenant_id: str, reload_id: str) -> tuple[Environment, Reload]:
        for env in ENVIRONMENTS:
            state = await self.bundles.load(tenant_id, bundles_entity(env))
            if reload_id in state.reloads:
                return env, state.reloads[reload_id]
        raise BundleNotFound("reload_not_found", f"no reload {reload_id!r}")

    async def get_reload(self, tenant_id: str, reload_id: str) -> dict[str, Any]:
        """``GET /v1/policy-reloads/{id}``: the impact report (live figures while a canary)."""
        _, reload = await self._find_reload(tenant_id, reload_id)
        return await self._report(reload)

    async def _report(self, reload: Reload) -> dict[str, Any]:
        if reload.status != "canary":
            return reload_document(reload)
        await self.flush_counts()
        elapsed = (self.clock() - reload.started_at).total_seconds()
        return reload_document(
            reload, canaries.report(await self.counts(reload.reload_id), elapsed)
        )

    async def list_reloads(self, tenant_id: str, environment: Environment | None) -> dict[str, Any]:
        """``GET /v1/policy-reloads``: every reload, newest first, with its report."""
        out: list[dict[str, Any]] = []
        for env in ENVIRONMENTS if environment is None else (environment,):
            state = await self.bundles.load(tenant_id, bundles_entity(env))
            out.extend([await self._report(r) for r in state.reloads.values()])
        out.sort(key=lambda r: str(r["started_at"]), reverse=True)
        return {"reloads": out}

    async def bundle_listing(self, tenant_id: str, environment: Environment) -> dict[str, Any]:
        """The tenant's uploaded bundles in ``environment`` and the active one."""
        state = await self.bundles.load(tenant_id, bundles_entity(environment))
        active = state.active.bundle_digest if state.active is not None else None
        return {
            "environment": environment,
            "active_digest": active,
            "bundles": [
                {
                    "bundle_digest": u.digest,
                    "revision": u.revision,
                    "signer_key_id": u.signer_key_id,
                    "active": u.digest == active,
                }
                for u in sorted(
                    state.uploaded.values(), key=lambda u: artifacts.revision_key(u.revision)
                )
            ],
        }

    async def put_settings(
        self, tenant_id: str, body: Mapping[str, Any], expected_version: int | None, actor: str
    ) -> dict[str, Any]:
        """``PUT /v1/policy-settings``: validate, version, record; applied at once here."""
        try:
            settings = PolicySettings.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidInput(f"settings_invalid: {problems}") from None
        async with begin(self.store) as uow:
            await uow.lock(CHANGES_LOCK)
            await self.settings.execute(
                tenant_id,
                SETTINGS_ENTITY,
                lambda s: change_settings(s, settings, expected_version),
                EventMeta(correlation_id=f"settings:{tenant_id}", actor=actor),
                uow=uow,
            )
            await _log_change(uow, tenant_id, "settings")
        await self.reload(tenant_id)
        return await self.get_settings(tenant_id)

    async def get_settings(self, tenant_id: str) -> dict[str, Any]:
        """``GET /v1/policy-settings``: the version and the settings (empty at version 0)."""
        return _settings_document(await self.settings.load(tenant_id, SETTINGS_ENTITY))

    async def grant_exception(
        self, tenant_id: str, body: Mapping[str, Any], actor: str, now: datetime
    ) -> dict[str, Any]:
        """``POST /v1/policy-exceptions``: record the waiver; applied at once here."""
        exception_id = str(body["exception_id"])
        decide = partial(
            waivers.grant,
            exception_id=exception_id,
            policy_id=body["policy_id"],
            agent_id=body.get("agent_id"),
            run_id=body.get("run_id"),
            reason=body["reason"],
            granted_by=actor,
            expires_at=body["expires_at"],
            now=now,
        )
        await self._change_exceptions(tenant_id, exception_id, decide, actor)
        return await self._exception(tenant_id, exception_id, now)

    async def revoke_exception(
        self, tenant_id: str, exception_id: str, reason: str | None, actor: str, now: datetime
    ) -> dict[str, Any]:
        """``POST /v1/policy-exceptions/{id}:revoke``: it applies to no decision from now on."""
        await self._change_exceptions(
            tenant_id,
            exception_id,
            lambda s: waivers.revoke(s, exception_id, actor, reason),
            actor,
        )
        return await self._exception(tenant_id, exception_id, now)

    async def expire_exceptions(self, now: datetime) -> int:
        """Record ``policy.exception_expired`` for every open waiver past its expiry, in every
        tenant this replica holds; how many were recorded."""
        count = 0
        for tenant_id, view in list(self._views.items()):
            if not any(w.expires_at <= now for w in view.exceptions):
                continue
            count += len(
                await self._change_exceptions(
                    tenant_id, "expiry", lambda s: waivers.expire(s, now), ACTOR
                )
            )
        return count

    async def sweep(self, clock: Callable[[], datetime]) -> None:
        """Close expired waivers until cancelled (every :attr:`interval_s` * 4)."""
        while True:
            try:
                await self.expire_exceptions(clock())
            except Exception as exc:
                log.warning("policy_exceptions.sweep_failed", error=redact_text(str(exc))[:500])
            await asyncio.sleep(self.interval_s * 4)

    async def _change_exceptions(
        self,
        tenant_id: str,
        correlation_id: str,
        decide: Callable[[waivers.Exceptions], list[DomainEvent]],
        actor: str,
    ) -> Sequence[Any]:
        async with begin(self.store) as uow:
            await uow.lock(CHANGES_LOCK)
            _, stored = await self.exceptions.execute(
                tenant_id,
                waivers.EXCEPTIONS_ENTITY,
                decide,
                EventMeta(correlation_id=correlation_id, actor=actor),
                uow=uow,
            )
            if stored:
                await _log_change(uow, tenant_id, "exceptions")
        if stored:
            await self.reload(tenant_id)
        return stored

    async def _exception(self, tenant_id: str, exception_id: str, now: datetime) -> dict[str, Any]:
        state = await self.exceptions.load(tenant_id, waivers.EXCEPTIONS_ENTITY)
        waiver = state.get(exception_id)
        if waiver is None:  # pragma: no cover - just recorded
            raise NotFound(f"exception_not_found: no policy exception {exception_id!r}")
        return {**waiver.as_dict(), "status": waivers.status_at(waiver, now)}

    async def list_exceptions(
        self, tenant_id: str, status: waivers.Status | None, now: datetime
    ) -> dict[str, Any]:
        """``GET /v1/policy-exceptions``: the waivers (of one status) and the burndown."""
        state = await self.exceptions.load(tenant_id, waivers.EXCEPTIONS_ENTITY)
        return waivers.listing(state, now, status)

    async def run_chaos(
        self, tenant_id: str, environment: Environment, case: chaos.Case, actor: str
    ) -> dict[str, Any]:
        """``POST /v1/policy-chaos``: run one case beside the tenant's bundle (never in
        production) and record ``policy.chaos_ran``."""
        if environment == "production":
            raise Forbidden(
                "chaos_production_refused: chaos cases run only in a non-production environment"
            )
        deciding = self.bundle_for(tenant_id, environment)
        figures = await asyncio.to_thread(chaos.run_case, case, deciding, tenant_id, self.clock())
        kept = bool(figures.pop("kept_deciding"))
        event = PolicyChaosRan(
            case=case, environment=environment, kept_deciding=kept, figures=figures, by=actor
        )
        await self.chaos.execute(
            tenant_id,
            CHAOS_ENTITY,
            lambda _: [event],
            EventMeta(correlation_id=f"chaos:{case}", actor=actor),
        )
        log.info("policy_chaos.ran", tenant_id=tenant_id, case=case, kept_deciding=kept)
        return {"case": case, "environment": environment, "kept_deciding": kept, "figures": figures}

    def status(self, tenant_id: str) -> dict[str, Any]:
        """What decides for the tenant in this replica: per environment, the bundle's digest,
        its source (``tenant`` or ``default``) and revision, and the canary in progress (if
        any); and the settings."""
        view = self.view(tenant_id)
        bundles: dict[str, dict[str, Any]] = {}
        for env in ENVIRONMENTS:
            own = view.bundles.get(env)
            bundles[env] = {
                "bundle_digest": (own or self.default).digest,
                "source": "tenant" if own is not None else "default",
                "revision": view.revisions.get(env) if own is not None else None,
            }
            canary = view.canaries.get(env)
            if canary is not None:  # the stable bundle above decides for the other runs
                bundles[env]["canary"] = {
                    "reload_id": canary.reload_id,
                    "bundle_digest": canary.candidate.digest,
                    "percent": canary.plan.percent,
                }
        return {"environments": bundles, "settings": _settings_document(view.settings)}


def _settings_document(state: Settings) -> dict[str, Any]:
    values = (
        state.settings.model_dump(mode="json", exclude_none=True)
        if state.settings is not None
        else {}
    )
    return {"version": state.version, "settings": values}


def _bundle_answer(
    checked: CheckedBundle, environment: str, *, created: bool, activated: bool
) -> dict[str, Any]:
    return {
        "bundle_digest": checked.digest,
        "environment": environment,
        "revision": checked.revision,
        "signer_key_id": checked.signer_key_id,
        "files": checked.files,
        "policies": [p.policy_id for p in checked.bundle.policies],
        "created": created,
        "activated": activated,
    }


async def _store_archive(uow: UnitOfWork, tenant_id: str, digest: str, archive: bytes) -> None:
    conn = uow.conn
    if conn is None:  # pragma: no cover - begin() always has a connection
        raise NotFound("no database connection for the archive")
    await conn.execute(
        "INSERT INTO policy_admission.bundle_archives (tenant_id, digest, archive) "
        "VALUES (%s, %s, %s) ON CONFLICT (tenant_id, digest) DO NOTHING",
        (tenant_id, digest, archive),
    )


async def _log_change(uow: UnitOfWork, tenant_id: str, kind: str) -> None:
    conn = uow.conn
    if conn is None:  # pragma: no cover - begin() always has a connection
        raise NotFound("no database connection for the change log")
    await conn.execute(
        "INSERT INTO policy_admission.changes (tenant_id, kind) VALUES (%s, %s)", (tenant_id, kind)
    )


log_change = _log_change
"""Add a row to the change log every replica follows (in the caller's transaction)."""


async def load_gates(store: EventStore, tenant_id: str) -> dict[str, AgentGate]:
    """The tenant's registered agents as admission holds them, from their read table."""
    async with transaction(store.pool) as conn:
        cur = await conn.execute(
            "SELECT agent_id, version, state, governed_version, disabled "
            "FROM policy_admission.agents WHERE tenant_id = %s",
            (tenant_id,),
        )
        rows = await cur.fetchall()
    return {
        r["agent_id"]: AgentGate(
            version=r["version"],
            state=r["state"],
            governed_version=r["governed_version"],
            disabled=frozenset(r["disabled"]),
        )
        for r in rows
    }


def stream_of(tenant_id: str, entity: str) -> str:
    """The stream id of one of the tenant's policy entities."""
    return stream_id_for(tenant_id, POLICY_CATEGORY, entity)
