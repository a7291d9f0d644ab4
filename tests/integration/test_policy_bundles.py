"""Signed, digest-pinned tenant bundles and settings, on two policy-admission replicas against the
real event store and NATS: upload, activate, every refusal while the active bundle keeps deciding,
and settings applied without a restart."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from libs import policy_bundles as artifacts
from libs.contracts.events import (
    PolicyBundleActivated,
    PolicyBundleUploaded,
    PolicyCanaryPromoted,
    PolicySettingsChanged,
    PolicySigningKeyRegistered,
    PolicySigningKeyRetired,
    RunStarted,
)
from libs.contracts.registry import decode
from libs.errors import Conflict, InvalidInput, MissionControlError, NotFound
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR, PolicyBundle
from services.policy_admission.handlers import AdmissionHandler
from services.policy_admission.tenant_bundles import stream_of
from tests.conftest import System, wait_until
from tests.integration.helpers.policy_bundles import (
    KEY_ID,
    dropping,
    new_key,
    replacing,
    repo_files,
    signed,
)
from tests.integration.test_admission import Admission, _append, running_admission

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]
KEY = new_key()
DEFAULT_DIGEST = PolicyBundle.load(DEFAULT_BUNDLE_DIR).digest


@dataclass
class Replicas:
    a: Admission
    b: Admission

    async def call(self, method: str, tenant: str, **body: Any) -> Any:
        # Uploads run the bundle's tests: seconds on a loaded machine.
        return await self.a.rpc.call(
            "admission", method, {"tenant_id": tenant, **body}, timeout=60.0
        )

    async def upload(self, tenant: str, archive: bytes, environment: str = "production") -> Any:
        b64 = base64.b64encode(archive).decode()
        return await self.call(
            "upload_bundle", tenant, environment=environment, archive_b64=b64, actor="user:ops"
        )

    async def activate(
        self, tenant: str, digest: str | None, environment: str = "production"
    ) -> Any:
        # At once, for every run: the canary is tested in test_policy_canary.
        return await self.call(
            "activate_bundle", tenant, environment=environment, bundle_digest=digest, immediate=True
        )


@pytest.fixture
async def replicas(system: System) -> AsyncIterator[Replicas]:
    async with running_admission(system) as a, running_admission(system) as b:
        yield Replicas(a, b)


async def _run(replicas: Replicas, tenant: str, run_id: str) -> None:
    await _append(replicas.a.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="agent-1"))


def _on(admission: Admission) -> AdmissionHandler:
    """That replica's own handler: a request over the bus may be answered by any replica."""
    handler = admission.service.handler
    assert handler is not None
    return handler


def _serves(admission: Admission, tenant: str, environment: str) -> str:
    tenants = admission.service.tenants
    assert tenants is not None
    return tenants.bundle_for(tenant, environment).digest


async def _digest_of_decision(
    admission: Admission, tenant: str, run_id: str, step: int, **extra: Any
) -> str:
    result = await _on(admission).admit(
        tenant,
        {
            "run_id": run_id,
            "step_index": step,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10},
            **extra,
        },
        {},
    )
    digest: str = result["bundle_digest"]
    return digest


async def _with_key(replicas: Replicas, tenant: str, key_id: str = KEY_ID, key: Any = KEY) -> None:
    await replicas.call(
        "put_signing_key",
        tenant,
        key_id=key_id,
        public_key=artifacts.public_pem(key),
        actor="user:admin",
    )


async def _events(replicas: Replicas, tenant: str, entity: str) -> list[Any]:
    return [decode(e) for e in await replicas.a.store.read_stream(stream_of(tenant, entity))]


async def test_an_activated_bundle_decides_on_every_replica_without_a_restart(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _run(replicas, tenant, run_id)
    assert await _digest_of_decision(replicas.b, tenant, run_id, 1) == DEFAULT_DIGEST

    await _with_key(replicas, tenant)
    archive = signed(KEY, repo_files(revision="1", max_tokens=None))
    stored = await replicas.upload(tenant, archive)
    digest = artifacts.archive_digest(archive)
    assert stored["bundle_digest"] == digest and stored["created"] and not stored["activated"]
    # Uploaded is not active.
    assert await _digest_of_decision(replicas.b, tenant, run_id, 2) == DEFAULT_DIGEST

    activated = await replicas.activate(tenant, digest)
    assert activated["activated"] is True
    # The replica that activated applied it before answering; the other follows the change log.
    for replica in (replicas.a, replicas.b):
        await wait_until(
            lambda r=replica: _serves(r, tenant, "production") == digest,
            what="both replicas switched bundles",
        )
    assert await _digest_of_decision(replicas.a, tenant, run_id, 3) == digest
    assert await _digest_of_decision(replicas.b, tenant, run_id, 4) == digest
    # The sandbox keeps the default bundle; another tenant too.
    assert await _digest_of_decision(replicas.b, tenant, run_id, 5, environment="sandbox") == (
        DEFAULT_DIGEST
    )
    status = await replicas.call("status", tenant)
    assert status["environments"]["production"] == {
        "bundle_digest": digest,
        "source": "tenant",
        "revision": "1",
    }
    assert status["environments"]["sandbox"]["source"] == "default"

    events = await _events(replicas, tenant, "bundles-production")
    assert [type(e) for e in events] == [
        PolicyBundleUploaded,
        PolicyBundleActivated,
        PolicyCanaryPromoted,
    ]
    assert events[2].reason == "immediate"
    assert events[1].bundle_digest == digest and events[1].signer_key_id == KEY_ID
    assert events[0].revision == "1"
    # Activating the active digest again changes nothing.
    assert (await replicas.activate(tenant, digest))["activated"] is False


async def test_a_replica_started_later_loads_the_active_bundle(
    system: System, replicas: Replicas, tenant: str, unique: Unique
) -> None:
    await _with_key(replicas, tenant)
    archive = signed(KEY, repo_files(revision="4"))
    await replicas.upload(tenant, archive, environment="sandbox")
    await replicas.activate(tenant, artifacts.archive_digest(archive), environment="sandbox")
    async with running_admission(system) as late:
        run_id = unique("late-run")
        await _run(replicas, tenant, run_id)
        digest = await _digest_of_decision(late, tenant, run_id, 1, environment="sandbox")
        assert digest == artifacts.archive_digest(archive)


async def _refused(call: Any, error: type[MissionControlError], reason: str) -> None:
    with pytest.raises(error) as caught:
        await call
    assert str(caught.value).startswith(f"{reason}: "), str(caught.value)


async def test_every_bad_bundle_is_refused_by_name_while_the_active_one_decides(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _run(replicas, tenant, run_id)
    await _with_key(replicas, tenant)
    good = signed(KEY, repo_files(revision="10"))
    active = artifacts.archive_digest(good)
    await replicas.upload(tenant, good)
    await replicas.activate(tenant, active)
    step = iter(range(1, 100))

    async def still_deciding() -> None:
        for replica in (replicas.a, replicas.b):
            await wait_until(
                lambda r=replica: _serves(r, tenant, "production") == active,
                what="the active bundle",
            )
            assert await _digest_of_decision(replica, tenant, run_id, next(step)) == active

    cases: list[tuple[bytes, type[MissionControlError], str]] = [
        (
            signed(KEY, repo_files("11"), after_signing=dropping(".signatures.json")),
            InvalidInput,
            "bundle_unsigned",
        ),
        (
            signed(KEY, repo_files("11"), after_signing=replacing("policies/cost_cap.rego", b"x")),
            InvalidInput,
            "bundle_file_tampered",
        ),
        (signed(new_key(), repo_files("11")), InvalidInput, "bundle_signature_invalid"),
        (signed(KEY, repo_files("11"), key_id="stranger"), InvalidInput, "bundle_key_unknown"),
        (
            signed(KEY, repo_files("11"), after_signing=replacing("policies/x.rego", b"package x")),
            InvalidInput,
            "bundle_file_unsigned",
        ),
        (
            signed(KEY, repo_files("11"), after_signing=dropping("policies/cost_cap.rego")),
            InvalidInput,
            "bundle_file_missing",
        ),
        (signed(KEY, repo_files("11", max_tokens=5)), InvalidInput, "bundle_tests_failed"),
        (signed(KEY, repo_files("9")), Conflict, "bundle_revision_replayed"),
        (b"not a tarball", InvalidInput, "bundle_malformed"),
    ]
    for archive, error, reason in cases:
        await _refused(replicas.upload(tenant, archive), error, reason)
        await still_deciding()

    # Unpinned reloads are refused by name, and so is a digest never uploaded.
    await _refused(replicas.activate(tenant, None), InvalidInput, "bundle_reload_unpinned")
    await _refused(replicas.activate(tenant, "sha256:" + "0" * 64), NotFound, "bundle_not_found")
    await still_deciding()

    # A replay: two newer revisions uploaded, the newest activated, then the older one.
    r12, r13 = signed(KEY, repo_files("12")), signed(KEY, repo_files("13"))
    await replicas.upload(tenant, r12)
    await replicas.upload(tenant, r13)
    active = artifacts.archive_digest(r13)
    await replicas.activate(tenant, active)
    await _refused(
        replicas.activate(tenant, artifacts.archive_digest(r12)),
        Conflict,
        "bundle_revision_replayed",
    )
    await still_deciding()

    # A key retired between upload and activation.
    rotated = new_key()
    await _with_key(replicas, tenant, "next-key", rotated)
    r14 = signed(rotated, repo_files("14"), key_id="next-key")
    await replicas.upload(tenant, r14)
    await replicas.call("retire_signing_key", tenant, key_id="next-key", reason="leaked")
    await _refused(
        replicas.activate(tenant, artifacts.archive_digest(r14)), InvalidInput, "bundle_key_retired"
    )
    await _refused(replicas.upload(tenant, r14), InvalidInput, "bundle_key_unknown")
    await still_deciding()
    keys = await _events(replicas, tenant, "signing-keys")
    assert [type(e) for e in keys] == [
        PolicySigningKeyRegistered,
        PolicySigningKeyRegistered,
        PolicySigningKeyRetired,
    ]
    # A retired id is never reused, and an id holds one key.
    await _refused(
        _with_key(replicas, tenant, "next-key", new_key()), Conflict, "signing_key_conflict"
    )
    await _refused(_with_key(replicas, tenant, KEY_ID, new_key()), Conflict, "signing_key_conflict")


async def test_a_digest_of_another_tenant_cannot_be_activated(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    await _with_key(replicas, tenant)
    archive = signed(KEY, repo_files("1"))
    await replicas.upload(tenant, archive)
    other = unique("tenant")
    await _with_key(replicas, other)
    await _refused(
        replicas.activate(other, artifacts.archive_digest(archive)), NotFound, "bundle_not_found"
    )


async def test_settings_apply_on_every_replica_and_are_versioned(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    run_id = unique("run")
    await _run(replicas, tenant, run_id)
    assert (await _admit_model(replicas.b, tenant, run_id, 1, "gpt-4o"))["outcome"] == "allow"

    first = await replicas.call(
        "put_settings", tenant, settings={"model_allowlist": ["claude-sonnet-4"]}, version=0
    )
    assert first == {"version": 1, "settings": {"model_allowlist": ["claude-sonnet-4"]}}
    for name, replica in (("a", replicas.a), ("b", replicas.b)):
        await wait_until(
            lambda r=replica: (
                r.service.tenants is not None and r.service.tenants.settings_for(tenant) is not None
            ),
            what="both replicas applied the settings",
        )
        other_run = unique(f"run-{name}-")
        await _run(replicas, tenant, other_run)
        denied = await _admit_model(replica, tenant, other_run, 1, "gpt-4o")
        assert denied["outcome"] == "deny"
        assert denied["reasons"][0]["policy_id"] == "model_allowlist"

    # Optimistic concurrency: a writer that read version 0 loses.
    await _refused(
        replicas.call("put_settings", tenant, settings={"max_tokens_per_run": 5}, version=0),
        Conflict,
        "settings_version_conflict",
    )
    await _refused(
        replicas.call("put_settings", tenant, settings={"max_tokens_per_run": -1}),
        InvalidInput,
        "settings_invalid",
    )
    await _refused(
        replicas.call("put_settings", tenant, settings={"max_token_per_run": 5}),
        InvalidInput,
        "settings_invalid",
    )
    assert (await replicas.call("get_settings", tenant))["version"] == 1
    events = await _events(replicas, tenant, "settings")
    assert [type(e) for e in events] == [PolicySettingsChanged]
    status = await replicas.call("status", tenant)
    assert status["settings"]["version"] == 1


async def _admit_model(
    admission: Admission, tenant: str, run_id: str, step: int, model: str
) -> dict[str, Any]:
    return await _on(admission).admit(
        tenant,
        {
            "run_id": run_id,
            "step_index": step,
            "model": model,
            "estimate": {"input_tokens": 10, "max_output_tokens": 10},
        },
        {},
    )
