"""Canary reloads on two policy-admission replicas against the real event store and NATS: the
candidate decides for its share of runs (the same bundle for every step of a run) while the
previous bundle decides for the rest; the figures roll a worse bundle back and promote a sound
one, an operator can end a canary, a canary in progress survives a restart, decisions never
stop during reloads, and every outcome is delivered, signed, to webhook subscribers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from libs import policy_bundles as artifacts
from libs.contracts import utcnow
from libs.contracts.events import (
    PolicyCanaryPromoted,
    PolicyCanaryRolledBack,
    PolicyCanaryStarted,
    RunStarted,
)
from libs.contracts.registry import decode
from libs.errors import Conflict, Forbidden, MissionControlError
from services.policy_admission.canary import in_canary
from services.policy_admission.chaos import CASES
from services.policy_admission.tenant_bundles import TenantPolicies, stream_of
from tests.conftest import System, wait_until
from tests.integration.helpers.policy_bundles import KEY_ID, new_key, repo_files, signed
from tests.integration.test_admission import Admission, _append, running_admission
from tests.integration.test_policy_bundles import DEFAULT_DIGEST, Replicas, _on
from tests.integration.test_policy_bundles import replicas as replicas  # the fixture

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]
KEY = new_key()
# The window closes on decisions and time: an hour, which a replica's clock skips (see _judge).
WINDOW = {"min_decisions": 10, "min_seconds": 3600}


def _tight(revision: str) -> bytes:
    """A signed bundle that denies every step over 5 tokens (its tests dropped: the repository's
    tests expect the default limit)."""
    files = {
        k: v for k, v in repo_files(revision, max_tokens=5).items() if not k.startswith("tests/")
    }
    return signed(KEY, files)


def _tenants(admission: Admission) -> TenantPolicies:
    tenants = admission.service.tenants
    assert tenants is not None
    return tenants


async def _judge(
    replicas: Replicas, tenant: str, judge: Admission | None = None, *, close: bool = True
) -> Any:
    """Write every replica's counts, move one replica's clock past the window (``close``), and
    wait for the outcome it records (the other replicas' clocks keep the window open)."""
    for replica in (replicas.a, replicas.b):
        await _tenants(replica).flush_counts()
    if close:
        _tenants(judge or replicas.a).clock = lambda: utcnow() + timedelta(hours=2)
    outcomes = (PolicyCanaryPromoted, PolicyCanaryRolledBack)

    async def ended() -> bool:
        return isinstance((await _events(replicas, tenant))[-1], outcomes)

    # The judging replica decides on its own tick, behind everything else a loaded machine runs.
    try:
        await wait_until(ended, timeout=60, what="the canary judged")
    except AssertionError as exc:
        # Say what the judging replica saw: the canary, the summed counts and its clock.
        tenants = _tenants(judge or replicas.a)
        seen = {
            env: (c.reload_id, await tenants.counts(c.reload_id), tenants.clock() - c.started_at)
            for env, c in tenants.view(tenant).canaries.items()
        }
        raise AssertionError(f"{exc}; the judging replica saw {seen}") from None
    return (await _events(replicas, tenant))[-1]


async def _setup(replicas: Replicas, tenant: str) -> str:
    """A key, and revision 1 (the repository's policies) active at once; its digest."""
    await replicas.call(
        "put_signing_key",
        tenant,
        key_id=KEY_ID,
        public_key=artifacts.public_pem(KEY),
        actor="user:admin",
    )
    archive = signed(KEY, repo_files("1"))
    await _upload(replicas, tenant, archive)
    await replicas.activate(tenant, artifacts.archive_digest(archive))
    return artifacts.archive_digest(archive)


async def _upload(replicas: Replicas, tenant: str, archive: bytes) -> str:
    b64 = base64.b64encode(archive).decode()
    await replicas.call("upload_bundle", tenant, archive_b64=b64, actor="user:ops")
    return artifacts.archive_digest(archive)


async def _canary(replicas: Replicas, tenant: str, digest: str, **plan: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await replicas.call(
        "activate_bundle", tenant, bundle_digest=digest, canary=plan, actor="user:ops"
    )
    return answer["reload"]


async def _everywhere(replicas: Replicas, tenant: str, reload_id: str) -> None:
    """Wait until both replicas run the canary (the one that took the activation applied it
    before answering; the other follows the change log)."""
    for replica in (replicas.a, replicas.b):
        await wait_until(
            lambda r=replica: (
                {c.reload_id for c in _tenants(r).view(tenant).canaries.values()} == {reload_id}
            ),
            what="both replicas run the canary",
        )


async def _decide(admission: Admission, tenant: str, run_id: str, step: int) -> dict[str, Any]:
    return await _on(admission).admit(
        tenant,
        {
            "run_id": run_id,
            "step_index": step,
            "model": "gpt-4o",
            "estimate": {"input_tokens": 10, "max_output_tokens": 10},
        },
        {},
    )


async def _events(replicas: Replicas, tenant: str) -> list[Any]:
    stream = stream_of(tenant, "bundles-production")
    return [decode(e) for e in await replicas.a.store.read_stream(stream)]


async def _runs(replicas: Replicas, tenant: str, unique: Unique, n: int) -> list[str]:
    runs = [unique(f"run{i}-") for i in range(n)]
    for run_id in runs:
        await _append(replicas.a.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="a"))
    return runs


async def _split(
    replicas: Replicas,
    tenant: str,
    unique: Unique,
    reload: dict[str, Any],
    *,
    canary: int,
    stable: int,
) -> list[str]:
    """Started runs of which exactly ``canary`` fall in the reload's share, alternating with the
    others while both last. Run ids are random, so a test that needs a window's worth of canary
    decisions picks its runs by share rather than hoping a random draw holds enough."""
    share = int(reload["plan"]["percent"])
    held: list[str] = []
    rest: list[str] = []
    tried = 0
    while len(held) < canary or len(rest) < stable:
        run_id = unique(f"run{tried}-")
        tried += 1
        arm = held if in_canary(run_id, reload["reload_id"], share) else rest
        if len(arm) < (canary if arm is held else stable):
            arm.append(run_id)
    runs = [r for pair in zip(held, rest, strict=False) for r in pair]
    runs += held[len(rest) :] + rest[len(held) :]
    for run_id in runs:
        await _append(replicas.a.store, tenant, run_id, RunStarted(run_id=run_id, agent_id="a"))
    return runs


async def test_a_canary_that_denies_more_is_rolled_back_by_its_figures(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    stable = await _setup(replicas, tenant)
    tight = await _upload(replicas, tenant, _tight("2"))
    reload = await _canary(replicas, tenant, tight, percent=50, **WINDOW)
    assert reload["status"] == "canary" and reload["stable_digest"] == stable
    reload_id = reload["reload_id"]
    # 11 canary runs of 21 decided, two steps each: the canary makes the window's 10 decisions.
    runs = await _split(replicas, tenant, unique, reload, canary=11, stable=10)
    canary_runs = {r for r in runs if in_canary(r, reload_id, 50)}
    assert len(canary_runs) == 11
    await _everywhere(replicas, tenant, reload_id)
    for i, run_id in enumerate(runs):
        # Both replicas decide; every step of a run is decided by the same bundle.
        replica = replicas.a if i % 2 else replicas.b
        first = await _decide(replica, tenant, run_id, 1)
        second = await _decide(replica, tenant, run_id, 2)
        expected = tight if run_id in canary_runs else stable
        assert first["bundle_digest"] == second["bundle_digest"] == expected
        assert first["outcome"] == ("deny" if run_id in canary_runs else "allow")

    rolled = await _judge(replicas, tenant)
    events = await _events(replicas, tenant)
    assert [type(e) for e in events[-2:]] == [PolicyCanaryStarted, PolicyCanaryRolledBack]
    assert rolled.reason == "deny_rate" and rolled.restored_digest == stable
    figures = rolled.figures
    assert figures["canary"]["deny_rate"] == 1.0 and figures["stable"]["deny_rate"] == 0.0
    assert figures["canary"]["decisions"] + figures["stable"]["decisions"] == 42

    # Every replica decides with the stable bundle again, for every run.
    for replica in (replicas.a, replicas.b):
        await wait_until(
            lambda r=replica: not _tenants(r).view(tenant).canaries,
            what="the canary withdrawn everywhere",
        )
        for run_id in list(canary_runs)[:3]:
            assert (await _decide(replica, tenant, run_id, 3))["bundle_digest"] == stable
    report = await replicas.call("get_reload", tenant, reload_id=reload_id)
    assert report["status"] == "rolled_back" and report["reason"] == "deny_rate"
    assert report["figures"]["deny_rate_delta"] == 1.0
    listing = await replicas.call("list_reloads", tenant)
    assert listing["reloads"][0]["reload_id"] == reload_id
    assert [r["status"] for r in listing["reloads"]] == ["rolled_back", "promoted"]
    # The rolled-back revision is spent: it can never be activated again.
    with pytest.raises(MissionControlError, match="bundle_revision_replayed"):
        await _canary(replicas, tenant, tight)


async def test_a_sound_canary_is_promoted_and_an_operator_can_end_one(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    stable = await _setup(replicas, tenant)
    same = await _upload(replicas, tenant, signed(KEY, repo_files("2")))
    reload = await _canary(replicas, tenant, same, percent=30, **WINDOW)
    # A second reload waits for the first.
    other = await _upload(replicas, tenant, signed(KEY, repo_files("3")))
    with pytest.raises(Conflict, match="canary_in_progress"):
        await _canary(replicas, tenant, other)
    await _everywhere(replicas, tenant, reload["reload_id"])
    runs = await _split(replicas, tenant, unique, reload, canary=20, stable=60)
    for run_id in runs:
        await _decide(replicas.a, tenant, run_id, 1)
    # The live report sums what every replica wrote (each writes every 250 ms).
    await _tenants(replicas.a).flush_counts()
    live = await replicas.call("get_reload", tenant, reload_id=reload["reload_id"])
    status = await replicas.call("status", tenant)
    assert status["environments"]["production"]["bundle_digest"] == stable
    assert status["environments"]["production"]["canary"] == {
        "reload_id": reload["reload_id"],
        "bundle_digest": same,
        "percent": 30,
    }
    assert live["status"] == "canary"
    assert live["figures"]["canary"]["decisions"] + live["figures"]["stable"]["decisions"] == 80
    assert live["figures"]["canary"]["decisions"] >= 10
    promoted = await _judge(replicas, tenant)
    _tenants(replicas.a).clock = utcnow
    assert isinstance(promoted, PolicyCanaryPromoted) and promoted.reason == "window_passed"
    for run_id in runs[:5]:
        assert (await _decide(replicas.b, tenant, run_id, 2))["bundle_digest"] in (same, stable)
    await wait_until(
        lambda: _tenants(replicas.b).bundle_for(tenant, "production").digest == same,
        what="promoted everywhere",
    )

    # An operator aborts the next canary before its window: the promoted bundle is restored.
    aborted = await _canary(replicas, tenant, other, percent=100, min_decisions=1000)
    # Both replicas run it first, so that "no canary" below means each has seen it end.
    await _everywhere(replicas, tenant, aborted["reload_id"])
    ended = await replicas.call(
        "end_canary",
        tenant,
        reload_id=aborted["reload_id"],
        outcome="rolled_back",
        reason="seen enough",
        actor="user:ops",
    )
    assert ended["status"] == "rolled_back" and ended["reason"] == "operator"
    assert ended["ended_by"] == "user:ops" and ended["detail"] == "seen enough"
    await wait_until(lambda: not _tenants(replicas.a).view(tenant).canaries, what="aborted")
    assert (await _decide(replicas.a, tenant, runs[0], 3))["bundle_digest"] == same
    with pytest.raises(Conflict, match="canary_not_in_progress"):
        await replicas.call(
            "end_canary", tenant, reload_id=aborted["reload_id"], outcome="promoted"
        )


def _failing(revision: str) -> bytes:
    """A signed bundle that compiles but fails to evaluate any step (a rule with two values)."""
    files = {k: v for k, v in repo_files(revision).items() if not k.startswith("tests/")}
    main = files["policies/main.rego"].decode()
    decision = 'decision := {\n\t"deny"'
    assert decision in main
    broken = "boom := 1 if input.step\nboom := 2 if input.step\n\n" + decision.replace(
        "{", '{\n\t"boom": boom,', 1
    )
    files["policies/main.rego"] = main.replace(decision, broken).encode()
    return signed(KEY, files)


async def test_a_candidate_that_fails_to_evaluate_loses_no_decision_and_is_rolled_back(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    stable = await _setup(replicas, tenant)
    failing = await _upload(replicas, tenant, _failing("2"))
    reload = await _canary(replicas, tenant, failing, percent=50, **WINDOW)
    await _everywhere(replicas, tenant, reload["reload_id"])
    runs = await _split(replicas, tenant, unique, reload, canary=6, stable=6)
    held = [r for r in runs if in_canary(r, reload["reload_id"], 50)]
    assert held
    # The first canary run's step is decided by the stable bundle, and counted as an error.
    answer = await _decide(replicas.a, tenant, held[0], 1)
    assert answer["bundle_digest"] == stable and answer["outcome"] == "allow"
    # One error is over the default budget (none): rolled back at once, window or not.
    rolled = await _judge(replicas, tenant, close=False)
    assert isinstance(rolled, PolicyCanaryRolledBack)
    assert rolled.reason == "evaluation_errors" and rolled.figures["canary"]["errors"] == 1
    for run_id in runs:
        assert (await _decide(replicas.b, tenant, run_id, 1))["bundle_digest"] == stable


async def test_a_canary_in_progress_resumes_after_a_restart_with_what_was_counted(
    system: System, replicas: Replicas, tenant: str, unique: Unique
) -> None:
    stable = await _setup(replicas, tenant)
    tight = await _upload(replicas, tenant, _tight("2"))
    async with running_admission(system) as doomed:
        await wait_until(lambda: _tenants(doomed).view(tenant).bundles, what="loaded")
        reload = await _canary(replicas, tenant, tight, percent=50, **WINDOW)
        await wait_until(lambda: _tenants(doomed).view(tenant).canaries, what="canary loaded")
        # 15 canary runs: the window's 10 canary decisions are there whatever the run ids.
        runs = await _split(replicas, tenant, unique, reload, canary=15, stable=15)
        for run_id in runs:
            await _decide(doomed, tenant, run_id, 1)
        await _tenants(doomed).flush_counts()
    # That replica is gone; one started now resumes the canary with what it counted.
    async with running_admission(system) as later:
        view = _tenants(later).view(tenant)
        assert view.canaries["production"].reload_id == reload["reload_id"]
        assert view.bundles["production"].digest == stable
        counts = await _tenants(later).counts(reload["reload_id"])
        assert counts["canary"].decisions + counts["stable"].decisions == 30
        rolled = await _judge(replicas, tenant, later)
    assert isinstance(rolled, PolicyCanaryRolledBack) and rolled.reason == "deny_rate"
    assert rolled.figures["canary"]["decisions"] + rolled.figures["stable"]["decisions"] == 30


async def test_decisions_never_stop_while_bundles_are_reloaded(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    """A stream of decisions runs while five reloads (canaries started, promoted, rolled back)
    happen: every request is answered, none fails, each by a bundle loaded at the time."""
    await _setup(replicas, tenant)
    runs = await _runs(replicas, tenant, unique, 40)
    done = asyncio.Event()
    answered: list[str] = []
    errors: list[BaseException] = []

    async def deciding() -> None:
        step = 0
        while not done.is_set():
            step += 1
            for run_id in runs:
                try:
                    answered.append(
                        (await _decide(replicas.b, tenant, run_id, step))["bundle_digest"]
                    )
                except BaseException as exc:
                    errors.append(exc)
            # Pacing: the stream runs in the replicas' own process and would otherwise starve
            # the reloads it is meant to run beside.
            await asyncio.sleep(0.05)

    task = asyncio.create_task(deciding())
    digests = []
    for revision in range(2, 7):
        digest = await _upload(replicas, tenant, signed(KEY, repo_files(str(revision))))
        digests.append(digest)
        before = len(answered)
        reload = await _canary(replicas, tenant, digest, percent=50, min_decisions=1000)
        outcome = "promoted" if revision % 2 else "rolled_back"
        await wait_until(lambda b=before: len(answered) > b + 5, what="decisions during a canary")
        await replicas.call(
            "end_canary", tenant, reload_id=reload["reload_id"], outcome=outcome, actor="user:ops"
        )
    before = len(answered)
    await wait_until(lambda: len(answered) > before + 5, what="decisions after the last reload")
    done.set()
    await task
    assert errors == []
    assert len(answered) > 5 * 5
    assert set(answered) <= {DEFAULT_DIGEST, *digests} | {answered[0]}


async def test_chaos_runs_in_sandbox_only_and_each_case_is_an_event(
    replicas: Replicas, tenant: str, unique: Unique
) -> None:
    await _setup(replicas, tenant)
    with pytest.raises(Forbidden, match="chaos_production_refused"):
        await replicas.call(
            "run_chaos", tenant, environment="production", case="expiry_storm", actor="user:ops"
        )
    (run_id,) = await _runs(replicas, tenant, unique, 1)
    for step, case in enumerate(CASES, start=1):
        result = await replicas.call(
            "run_chaos", tenant, environment="sandbox", case=case, actor="user:ops"
        )
        assert result["kept_deciding"] is True, result
        assert result["figures"]["deciding_digest"] == DEFAULT_DIGEST  # sandbox: the default
        # Admission decides as before in both environments.
        assert (await _decide(replicas.b, tenant, run_id, step))["outcome"] == "allow"
    stream = stream_of(tenant, "chaos")
    ran = [decode(e) for e in await replicas.a.store.read_stream(stream)]
    assert [(e.case, e.kept_deciding, e.by) for e in ran] == [(c, True, "user:ops") for c in CASES]
    assert ran[2].figures["expired_in_one_sweep"] == 10_000


# --- webhooks ---------------------------------------------------------------------------------


class _Receiver:
    """A local HTTP server that answers 503 to its first ``failures`` requests, then 204."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.refused < receiver.failures:
                    receiver.refused += 1
                    self.send_response(503)
                else:
                    receiver.received.append((dict(self.headers.items()), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@contextmanager
def receiving(failures: int = 0) -> Iterator[_Receiver]:
    receiver = _Receiver(failures)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def _signature_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver checks, written from the documented format (not the service's code)."""
    parts = dict(p.split("=", 1) for p in headers["Mc-Webhook-Signature"].split(","))
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    return (
        hmac.compare_digest(mac.hexdigest(), parts["v1"])
        and abs(time.time() - int(parts["t"])) < 300
    )


async def test_reload_outcomes_reach_webhooks_signed_even_when_the_receiver_fails_first(
    replicas: Replicas, tenant: str
) -> None:
    with receiving(failures=0) as steady, receiving(failures=4) as flaky:
        # Retries come back quickly here (production waits seconds, then minutes).
        for replica in (replicas.a, replicas.b):
            _tenants(replica).webhooks.backoff_base_s = 0.05
        made = [
            await replicas.call("create_webhook", tenant, url=r.url, actor="user:admin")
            for r in (steady, flaky)
        ]
        assert all(m["secret"].startswith("whsec_") for m in made)
        listing = await replicas.call("list_webhooks", tenant)
        assert len(listing["webhooks"]) == 2
        assert "secret" not in json.dumps(listing)

        await _setup(replicas, tenant)  # an immediate reload: one outcome
        await wait_until(lambda: len(steady.received) == 1, what="delivered to the steady one")
        await wait_until(lambda: len(flaky.received) == 1, what="delivered after failures")
        assert flaky.refused == 4
        for receiver, sub in ((steady, made[0]), (flaky, made[1])):
            headers, body = receiver.received[0]
            assert _signature_ok(sub["secret"], headers, body)
            assert not _signature_ok(sub["secret"], headers, body + b" ")
            assert headers["Mc-Event-Type"] == "policy.canary_promoted"
            report = json.loads(body)
            assert report["status"] == "promoted" and report["reason"] == "immediate"
        # The secret is in no event.
        events = await _events(replicas, tenant)
        assert all(
            m["secret"] not in json.dumps(e.model_dump(mode="json")) for e in events for m in made
        )

        async def delivered() -> list[int]:
            listing = await replicas.call("list_webhooks", tenant)
            return [w["deliveries"]["delivered"] for w in listing["webhooks"]]

        # Marked delivered once the receiver answered.
        await wait_until(lambda: _equals(delivered(), [1, 1]), what="both marked delivered")
        await replicas.call("delete_webhook", tenant, webhook_id=made[1]["webhook_id"])
        with pytest.raises(MissionControlError, match="webhook_not_found"):
            await replicas.call("delete_webhook", tenant, webhook_id=made[1]["webhook_id"])
        with pytest.raises(MissionControlError, match="webhook_url_invalid"):
            await replicas.call("create_webhook", tenant, url="ftp://x/y", actor="user:admin")


async def test_deliveries_wait_in_the_outbox_while_no_replica_runs(
    system: System, tenant: str, unique: Unique
) -> None:
    """Outcomes recorded while delivery is down are delivered once a replica starts."""
    with receiving() as receiver:
        async with running_admission(system) as a, running_admission(system) as b:
            replicas = Replicas(a, b)
            for replica in (a, b):
                # Delivery down: nothing is sent while these replicas run.
                task = replica.service._deliver
                assert task is not None
                task.cancel()
            await replicas.call("create_webhook", tenant, url=receiver.url, actor="user:admin")
            await _setup(replicas, tenant)
            digest = await _upload(replicas, tenant, signed(KEY, repo_files("2")))
            reload = await _canary(replicas, tenant, digest, percent=10)
            await replicas.call(
                "end_canary", tenant, reload_id=reload["reload_id"], outcome="promoted"
            )
            listing = await replicas.call("list_webhooks", tenant)
            assert listing["webhooks"][0]["deliveries"]["pending"] == 2
            assert receiver.received == []
        async with running_admission(system):
            await wait_until(lambda: len(receiver.received) == 2, what="the outbox delivered")
        kinds = [json.loads(body)["reason"] for _, body in receiver.received]
        assert sorted(kinds) == ["immediate", "operator"]
