"""The gateway's token buckets per API key and per tenant (pure: the clock is passed in)."""

from __future__ import annotations

import pytest

from libs.errors import InvalidInput
from services.gateway.ratelimit import KEY, TENANT, Limit, RateLimiter, parse_overrides

pytestmark = pytest.mark.unit


def _limiter(**tenants: Limit) -> RateLimiter:
    return RateLimiter(Limit(2, 3), Limit(10, 5), tenants)


def test_a_key_spends_its_burst_then_is_refused_until_a_token_refills() -> None:
    rl = _limiter()
    assert [rl.take("acme", "k1", 0.0) for _ in range(3)] == [None, None, None]
    refused = rl.take("acme", "k1", 0.0)
    assert refused is not None
    assert (refused.scope, refused.subject, refused.retry_after_s) == (KEY, "k1", 1)
    assert "2 requests per second (burst 3)" in refused.message
    assert rl.take("acme", "k1", 0.49) is not None  # half a token is not one
    assert rl.take("acme", "k1", 0.5) is None  # 2 per second: one token after 0.5 s


def test_the_bucket_never_holds_more_than_its_burst() -> None:
    rl = _limiter()
    rl.take("acme", "k1", 0.0)
    taken = [rl.take("acme", "k1", 1000.0) for _ in range(4)]
    assert taken[:3] == [None, None, None] and taken[3] is not None


def test_the_tenant_bucket_is_shared_by_its_keys() -> None:
    rl = _limiter()
    results = [rl.take("acme", f"k{i % 3}", 0.0) for i in range(6)]
    assert results[:5] == [None] * 5
    refused = results[5]
    assert refused is not None and (refused.scope, refused.subject) == (TENANT, "acme")
    assert rl.take("other", "k9", 0.0) is None  # another tenant is untouched


def test_a_refused_request_spends_nothing() -> None:
    rl = RateLimiter(Limit(1, 5), Limit(1, 1), {})
    assert rl.take("acme", "k1", 0.0) is None
    for _ in range(10):
        assert rl.take("acme", "k1", 0.0) is not None  # the tenant refuses ...
    # ... and the key's bucket still holds its 4 tokens once the tenant's refills.
    assert [rl.take("acme", "k1", 1.0 + i) for i in range(4)] == [None] * 4


def test_a_tenant_override_replaces_the_default_and_retry_after_rounds_up() -> None:
    rl = _limiter(slow=Limit(0.25, 1))
    assert rl.take("slow", "k1", 0.0) is None
    refused = rl.take("slow", "k2", 0.0)
    assert refused is not None and refused.scope == TENANT
    assert refused.retry_after_s == 4
    assert rl.tenant_limit("fast") == Limit(10, 5)


def test_a_rate_of_zero_is_no_limit() -> None:
    rl = RateLimiter(Limit(0, 1), Limit(0, 1), {})
    assert all(rl.take("acme", "k1", 0.0) is None for _ in range(1000))


def test_overrides_parse_and_bad_ones_are_named() -> None:
    assert parse_overrides("") == {}
    assert parse_overrides("acme=50:100, beta=0.5:2") == {
        "acme": Limit(50, 100),
        "beta": Limit(0.5, 2),
    }
    for bad in ("acme", "acme=5", "acme=x:1", "=1:1", "acme=1:0", "acme=-1:3"):
        with pytest.raises(InvalidInput, match="MC_RATE_LIMIT_TENANTS"):
            parse_overrides(bad)
