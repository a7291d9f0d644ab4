"""The canary's pure parts: which runs it holds, the latency histogram, the judgement that
promotes or rolls back, and the webhook signature; and the chaos cases."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from libs.contracts.policy import CanaryPlan
from libs.errors import InvalidInput
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR, PolicyBundle
from services.policy_admission.canary import (
    Arm,
    ArmStats,
    Meter,
    bucket_of,
    in_canary,
    judge,
    latency_bucket,
)
from services.policy_admission.chaos import CASES, Case, run_case
from services.policy_admission.webhooks import check_url, sign, verify

PLAN = CanaryPlan(percent=10, min_decisions=100, min_seconds=60)


def _arm(decisions: int, denies: int = 0, errors: int = 0, ms: float = 1.0) -> ArmStats:
    stats = ArmStats()
    for i in range(decisions):
        stats.observe(denied=i < denies, error=i >= decisions - errors, seconds=ms / 1000)
    return stats


def _arms(canary: ArmStats, stable: ArmStats) -> dict[Arm, ArmStats]:
    return {"canary": canary, "stable": stable}


def test_a_run_is_placed_by_a_stable_hash_and_the_share_matches_the_percent() -> None:
    runs = [f"run-{i}" for i in range(20_000)]
    held = [r for r in runs if in_canary(r, "reload-1", 10)]
    assert 0.09 < len(held) / len(runs) < 0.11
    # The same answer every time (every step of a run, every replica), another for another reload.
    assert held == [r for r in runs if in_canary(r, "reload-1", 10)]
    assert held != [r for r in runs if in_canary(r, "reload-2", 10)]
    assert bucket_of("run-1", "reload-1") == bucket_of("run-1", "reload-1")
    assert all(in_canary(r, "reload-1", 100) for r in runs[:100])


def test_latency_buckets_and_the_p95() -> None:
    assert latency_bucket(0.0) == 0
    assert latency_bucket(0.001) > latency_bucket(0.0001)
    stats = _arm(100, ms=1.0)
    for _ in range(10):
        stats.observe(denied=False, error=False, seconds=0.05)
    p95 = stats.quantile_ms(0.95)
    assert p95 is not None and 40 <= p95 <= 63
    assert ArmStats().quantile_ms(0.95) is None


def test_the_window_stays_open_until_decisions_and_time_are_reached() -> None:
    sound = _arms(_arm(100), _arm(900))
    assert judge(PLAN, _arms(_arm(99), _arm(900)), 120) is None
    assert judge(PLAN, sound, 59) is None
    verdict = judge(PLAN, sound, 60)
    assert verdict is not None and verdict.outcome == "promoted"
    assert verdict.reason == "window_passed"
    assert verdict.figures["canary"]["decisions"] == 100


def test_an_evaluation_error_rolls_back_at_once() -> None:
    verdict = judge(PLAN, _arms(_arm(3, errors=1), _arm(30)), 1)
    assert verdict is not None and verdict.outcome == "rolled_back"
    assert verdict.reason == "evaluation_errors"
    # A budget of 5 % of the window allows five.
    lenient = PLAN.model_copy(update={"max_error_rate": 0.05})
    assert judge(lenient, _arms(_arm(50, errors=5), _arm(30)), 1) is None
    assert judge(lenient, _arms(_arm(50, errors=6), _arm(30)), 1) is not None


def test_a_deny_rate_above_the_bound_rolls_back_and_at_the_bound_promotes() -> None:
    stable = _arm(1000, denies=100)  # 10 %
    at_bound = judge(PLAN, _arms(_arm(100, denies=15), stable), 60)
    assert at_bound is not None and at_bound.outcome == "promoted"
    above = judge(PLAN, _arms(_arm(100, denies=16), stable), 60)
    assert above is not None and above.outcome == "rolled_back" and above.reason == "deny_rate"
    assert above.figures["deny_rate_delta"] == 0.06


def test_a_slower_canary_rolls_back_on_its_p95() -> None:
    verdict = judge(PLAN, _arms(_arm(100, ms=20.0), _arm(1000, ms=1.0)), 60)
    assert verdict is not None and verdict.reason == "latency"
    assert verdict.figures["p95_delta_ms"] > PLAN.max_p95_delta_ms
    close = judge(PLAN, _arms(_arm(100, ms=1.2), _arm(1000, ms=1.0)), 60)
    assert close is not None and close.outcome == "promoted"


def test_without_stable_decisions_only_errors_judge() -> None:
    verdict = judge(PLAN, _arms(_arm(100, denies=100), ArmStats()), 60)
    assert verdict is not None and verdict.outcome == "promoted"


def test_the_meter_counts_per_reload_and_arm() -> None:
    meter = Meter()
    meter.observe("t", "r1", "canary", denied=True, error=False, seconds=0.001)
    meter.observe("t", "r1", "stable", denied=False, error=False, seconds=0.001)
    meter.observe("t", "r1", "canary", denied=False, error=True, seconds=0.0)
    arms = meter.of("r1")
    assert (arms["canary"].decisions, arms["canary"].denies, arms["canary"].errors) == (2, 1, 1)
    assert arms["stable"].decisions == 1 and meter.dirty == {"r1"}
    meter.forget("r1")
    assert meter.of("r1") == {}


def test_the_webhook_signature_is_hmac_sha256_over_the_timestamp_and_body() -> None:
    body = b'{"reload_id":"x"}'
    header = sign("whsec_k", body, 1_700_000_000)
    expected = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_k", header, body, now=1_700_000_100)
    assert not verify("whsec_k", header, body + b" ", now=1_700_000_100)
    assert not verify("other", header, body, now=1_700_000_100)
    assert not verify("whsec_k", header, body, now=1_700_001_000)  # too old: a replay
    assert not verify("whsec_k", "garbage", body, now=1_700_000_000)


def test_webhook_urls_are_absolute_http_without_credentials() -> None:
    assert check_url("https://hooks.example.com/mc") == "https://hooks.example.com/mc"
    for bad in ("ftp://x/y", "/relative", "https://user:pw@example.com/", "http://"):
        with pytest.raises(InvalidInput, match="webhook_url_invalid"):
            check_url(bad)


@pytest.mark.parametrize("case", CASES)
def test_every_chaos_case_leaves_the_last_good_bundle_deciding(case: Case) -> None:
    bundle = PolicyBundle.load(DEFAULT_BUNDLE_DIR)
    figures = run_case(case, bundle, "acme", datetime(2026, 11, 30, 12, 0, 0, 250_000, tzinfo=UTC))
    assert figures["kept_deciding"] is True
    assert figures["deciding_digest"] == bundle.digest
    assert figures["probe_outcome"] in ("allow", "warn", "deny")
    if case == "partial_reload_failure":
        assert "chaos_broken.rego" in figures["load_refused"]
    elif case == "conflicting_policies":
        assert "failed" in figures["candidate_failed"]
    elif case == "agent_load":
        assert figures["agents"] == figures["decided"] == 2_000 and figures["failed"] == 0
        # The mix of models gets both answers the bundle gives a first step: allowed, and a
        # warning for the model without a price.
        assert figures["outcomes"] == {"allow": 1_500, "warn": 500, "deny": 0}
    else:
        assert figures["exceptions"] == figures["expired_in_one_sweep"] == 10_000
        assert figures["applied_before_expiry"] and not figures["applied_at_expiry"]
        assert figures["expires_at"] == "2026-11-30T12:00:01+00:00"
