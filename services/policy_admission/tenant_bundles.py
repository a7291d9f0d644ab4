"""Tenants' signed bundles, signing keys and settings: what is recorded, and what every replica
decides with.

Streams (category ``policy``, one set per tenant):

* ``<t>/policy/signing-keys``: ``policy.signing_key_registered`` / ``_retired``;
* ``<t>/policy/bundles-<environment>``: ``policy.bundle_uploaded`` and
  ``policy.bundle_activated`` (by digest) for ``sandbox`` and ``production``;
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
from libs.contracts import stream_id_for
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PolicyBundleActivated,
    PolicyBundleUploaded,
    PolicyInfo,
    PolicySettingsChanged,
    PolicySigningKeyRegistered,
    PolicySigningKeyRetired,
)
from libs.contracts.policy import ENVIRONMENTS, Environment, PolicySettings, policy_set_hash
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.db import transaction
from libs.eventbus.repository import Aggregate, EventMeta, Recorded, Repository, begin
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork
from libs.policy_bundles import BundleConflict, BundleNotFound, BundleRejected
from libs.redaction import redact_text
from services.policy_admission import exceptions as waivers
from services.policy_admission.agents import AgentGate
from services.policy_admission.bundle import BundleError, PolicyBundle
from services.policy_admission.rego_tests import run_sources

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
class Bundles:
    """A tenant's bundles in one environment: uploaded, the active one, the highest revision
    ever activated."""

    uploaded: dict[str, Uploaded] = field(default_factory=dict)
    active: PolicyBundleActivated | None = None
    highest: tuple[int, ...] | None = None


def _fold_bundles(state: Bundles, recorded: Sequence[Recorded]) -> Bundles:
    uploaded, active, highest = dict(state.uploaded), state.active, state.highest
    for r in recorded:
        e = r.event
        if isinstance(e, PolicyBundleUploaded):
            uploaded[e.bundle_digest] = Uploaded(
                e.bundle_digest, e.revision, e.signer_key_id, tuple(e.policies)
            )
        elif isinstance(e, PolicyBundleActivated):
            active = e
            if e.revision is not None:
                key = artifacts.revision_key(e.revision)
                highest = key if highest is None else max(highest, key)
    return Bundles(uploaded, active, highest)


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
class TenantView:
    """One tenant's bundles (by environment) and settings, as loaded in this replica."""

    bundles: Mapping[str, PolicyBundle] = field(default_factory=dict)
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
    ) -> None:
        self.store = store
        self.default = default
        self.interval_s = interval_s
        self.keys = Repository(store, KEYS, max_retries=4)
        self.bundles = Repository(store, BUNDLES, max_retries=4)
        self.settings = Repository(store, SETTINGS, max_retries=4)
        self.exceptions = Repository(store, waivers.EXCEPTIONS, max_retries=4)
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
        """Poll until cancelled; a failed poll is logged and retried at the next tick."""
        while True:
            try:
                await self.poll()
            except Exception as exc:
                log.warning("policy_follow.poll_failed", error=redact_text(str(exc))[:500])
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
            for env in ENVIRONMENTS:
                state = await self.bundles.load(tenant_id, bundles_entity(env))
                active = state.active
                if active is None or (
                    env in bundles and bundles[env].digest == active.bundle_digest
                ):
                    continue
                try:
                    bundles[env] = await self._load_active(tenant_id, active)
                    revisions[env] = active.revision or ""
                except Exception as exc:
                    log.error(
                        "policy_bundle.load_failed",
                        tenant_id=tenant_id,
                        environment=env,
                        bundle_digest=active.bundle_digest,
                        error=redact_text(str(exc))[:500],
                    )
            settings = await self.settings.load(tenant_id, SETTINGS_ENTITY)
            granted = await self.exceptions.load(tenant_id, waivers.EXCEPTIONS_ENTITY)
            settings_input = settings.settings.as_input() if settings.settings is not None else None
            open_waivers = granted.open()
            view = TenantView(
                bundles=bundles,
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
        self, tenant_id: str, environment: Environment, digest: str | None, actor: str
    ) -> dict[str, Any]:
        """Activate the uploaded bundle ``digest`` (required) after verifying it again."""
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
            _, stored = await self.bundles.execute(
                tenant_id,
                bundles_entity(environment),
                lambda s: record_activation(s, checked, environment, public_key),
                EventMeta(correlation_id=digest, actor=actor),
                uow=uow,
            )
            if stored:
                await _log_change(uow, tenant_id, "activation")
        # This replica applies it at once; the others follow the change log.
        await self.reload(tenant_id)
        return _bundle_answer(checked, environment, created=False, activated=bool(stored))

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

    def status(self, tenant_id: str) -> dict[str, Any]:
        """What decides for the tenant in this replica: per environment, the bundle's digest,
        its source (``tenant`` or ``default``) and revision; and the settings."""
        view = self.view(tenant_id)
        bundles = {}
        for env in ENVIRONMENTS:
            own = view.bundles.get(env)
            bundles[env] = {
                "bundle_digest": (own or self.default).digest,
                "source": "tenant" if own is not None else "default",
                "revision": view.revisions.get(env) if own is not None else None,
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
