"""Policy exceptions on two policy-admission replicas against the real event store and NATS: a
granted waiver admits a step its policy denied, naming the exception, until the second it
expires; the sweeper records the expiry; a revocation stops it on every replica."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from libs.contracts import stream_id_for, utcnow
from libs.contracts.events import (
    AdmissionDecided,
    PolicyExceptionExpired,
    PolicyExceptionGranted,
    PolicyExceptionRevoked,
)
from libs.contracts.registry import decode
from libs.errors import InvalidInput
from tests.conftest import System, wait_until
from tests.integration.test_admission import Admission, running_admission
from tests.integration.test_policy_bundles import (
    Replicas,
    _admit_model,
    _events,
    _on,
    _refused,
    _run,
)

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]
DENIED_MODEL = "gpt-4o"


@pytest.fixture
async def replicas(system: System) -> AsyncIterator[Replicas]:
    async with running_admission(system) as a, running_admission(system) as b:
        yield Replicas(a, b)


async def _deny_gpt(replicas: Replicas, tenant: str) -> None:
    await replicas.call(
        "put_settings", tenant, settings={"model_allowlist": ["claude-sonnet-4"]}, version=0
    )


async def _grant(replicas: Replicas, tenant: str, exception_id: str, expires_at: datetime) -> Any:
    return await replicas.call(
        "grant_exception",
        tenant,
        exception_id=exception_id,
        policy_id="model_allowlist",
        agent_id="agent-1",
        reason="the new model is being evaluated",
        expires_at=expires_at.isoformat(),
        actor="user:admin",
    )


def _holds(admission: Admission, tenant: str, exception_id: str) -> bool:
    tenants = admission.service.tenants
    assert tenants is not None
    return any(w.exception_id == exception_id for w in tenants.exceptions_for(tenant))


async def _fresh_admit(
    replicas: Replicas, admission: Admission, tenant: str, unique: Unique, name: str
) -> dict[str, Any]:
    # A fresh run each time: a denied step stops its run, and later steps would be run_state.
    run_id = unique(f"run-{name}-")
    await _run(replicas, tenant, run_id)
    return await _admit_model(admission, tenant, run_id, 1, DENIED_MODEL)


async def test_a_waiver_admits_what_its_policy_denied_until_the_second_it_expires(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    await _deny_gpt(replicas, tenant)
    await wait_until(
        lambda: all(
            r.service.tenants is not None and r.service.tenants.settings_for(tenant) is not None
            for r in (replicas.a, replicas.b)
        ),
        what="both replicas applied the settings",
    )
    denied = await _fresh_admit(replicas, replicas.b, tenant, unique, "before")
    assert denied["outcome"] == "deny" and denied["exceptions"] == []

    expires_at = utcnow().replace(microsecond=0) + timedelta(seconds=3)
    granted = await _grant(replicas, tenant, "ex-model", expires_at)
    assert granted["status"] == "open" and granted["granted_by"] == "user:admin"
    assert granted["expires_at"] == expires_at.isoformat()
    await wait_until(lambda: _holds(replicas.b, tenant, "ex-model"), what="replica b holds it")

    waived = await _fresh_admit(replicas, replicas.b, tenant, unique, "waived")
    assert waived["outcome"] == "warn"
    assert waived["exceptions"] == ["ex-model"]
    assert waived["context"]["exceptions"] == ["ex-model"]
    assert waived["reasons"][0]["policy_id"] == "model_allowlist"
    recorded = [
        decode(e)
        for e in await replicas.a.store.read_stream(
            stream_id_for(tenant, "decisions", waived["context"]["run_id"])
        )
    ]
    assert [type(e) for e in recorded] == [AdmissionDecided]  # no violation, no incident
    assert recorded[0].context["exceptions"] == ["ex-model"]  # type: ignore[attr-defined]

    # The decision's own clock decides: applied up to the last microsecond, never at expiry.
    handler = _on(replicas.b)
    handler.clock = lambda: expires_at - timedelta(microseconds=1)
    assert (await _fresh_admit(replicas, replicas.b, tenant, unique, "last"))["outcome"] == "warn"
    handler.clock = lambda: expires_at
    at_expiry = await _fresh_admit(replicas, replicas.b, tenant, unique, "at")
    assert at_expiry["outcome"] == "deny" and at_expiry["exceptions"] == []
    handler.clock = utcnow

    # The sweeper records the expiry once the real clock passes it; then it is listed as such.
    async def expired() -> bool:
        events = await _events(replicas, tenant, "exceptions")
        return any(isinstance(e, PolicyExceptionExpired) for e in events)

    await wait_until(expired, timeout=30.0, what="policy.exception_expired recorded")
    events = await _events(replicas, tenant, "exceptions")
    assert [type(e) for e in events] == [PolicyExceptionGranted, PolicyExceptionExpired]
    listing = await replicas.call("list_exceptions", tenant, status="expired")
    assert [e["exception_id"] for e in listing["exceptions"]] == ["ex-model"]
    assert listing["burndown"] == []
    after = await _fresh_admit(replicas, replicas.a, tenant, unique, "after")
    assert after["outcome"] == "deny"


async def test_a_revoked_waiver_stops_applying_on_every_replica(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    await _deny_gpt(replicas, tenant)
    expires_at = utcnow().replace(microsecond=0) + timedelta(days=2)
    await _grant(replicas, tenant, "ex-revoked", expires_at)
    for replica in (replicas.a, replicas.b):
        await wait_until(lambda r=replica: _holds(r, tenant, "ex-revoked"), what="held")
        waived = await _fresh_admit(replicas, replica, tenant, unique, "open")
        assert waived["outcome"] == "warn" and waived["exceptions"] == ["ex-revoked"]
    listing = await replicas.call("list_exceptions", tenant, status="open")
    assert listing["burndown"] == [{"day": expires_at.date().isoformat(), "open": 1}]

    revoked = await replicas.call(
        "revoke_exception", tenant, exception_id="ex-revoked", actor="user:admin"
    )
    assert revoked["status"] == "revoked" and revoked["closed_by"] == "user:admin"
    for replica in (replicas.a, replicas.b):
        await wait_until(lambda r=replica: not _holds(r, tenant, "ex-revoked"), what="dropped")
        denied = await _fresh_admit(replicas, replica, tenant, unique, "revoked")
        assert denied["outcome"] == "deny" and denied["exceptions"] == []
    events = await _events(replicas, tenant, "exceptions")
    assert [type(e) for e in events] == [PolicyExceptionGranted, PolicyExceptionRevoked]


async def test_a_grant_past_or_too_far_is_refused_by_name(replicas: Replicas, tenant: str) -> None:
    now = utcnow()
    await _refused(
        _grant(replicas, tenant, "ex-past", now - timedelta(seconds=1)),
        InvalidInput,
        "exception_expiry_past",
    )
    await _refused(
        _grant(replicas, tenant, "ex-far", now + timedelta(days=91)),
        InvalidInput,
        "exception_expiry_too_far",
    )
    assert await _events(replicas, tenant, "exceptions") == []
