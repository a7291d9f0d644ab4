"""Rate limits of the gateway's ``/v1`` API: token buckets per API key and per tenant.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; each request takes
one from its key's bucket and one from its tenant's. A request either bucket cannot pay for is
refused with ``429``, a ``Retry-After`` of the whole seconds until both can, and a body naming
the limit it hit. Pure: the clock is passed in, so every rule is testable without waiting.

Buckets live in the gateway process: with N gateway replicas a key may spend up to N times its
limit, spread over them (a load balancer that spreads requests evenly makes each replica's share
one Nth). Idle buckets are forgotten (least recently used first), which only ever refills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cachetools import LRUCache

from libs.errors import InvalidInput

MAX_BUCKETS = 100_000
RATE_LIMITED = "rate_limited"
"""The error code of a request refused by a rate limit."""
KEY = "key"
TENANT = "tenant"


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens a second, ``burst`` at most; a rate of 0 means no limit."""

    rate: float
    burst: int

    @property
    def enabled(self) -> bool:
        """Whether the limit applies at all."""
        return self.rate > 0


@dataclass
class _Bucket:
    tokens: float
    stamp: float

    def refill(self, limit: Limit, now: float) -> None:
        self.tokens = min(float(limit.burst), self.tokens + (now - self.stamp) * limit.rate)
        self.stamp = now

    def wait(self, limit: Limit) -> float:
        """Seconds until one token is there (0 when it is now)."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / limit.rate


@dataclass(frozen=True)
class Refusal:
    """A request over a limit: which one (``key`` or ``tenant``), whose, and when to retry."""

    scope: str
    subject: str
    limit: Limit
    retry_after_s: int

    @property
    def message(self) -> str:
        """What the 429 body says: the limit, in words."""
        return (
            f"rate limit of {self.scope} {self.subject!r} exceeded: {self.limit.rate:g} requests "
            f"per second (burst {self.limit.burst}); retry after {self.retry_after_s}s"
        )


def parse_overrides(text: str) -> dict[str, Limit]:
    """``"acme=50:100,beta=5:10"`` (tenant=rate:burst) as limits per tenant.

    Raises :class:`InvalidInput` naming the entry that does not parse.
    """
    out: dict[str, Limit] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            tenant, spec = entry.split("=", 1)
            rate, burst = spec.split(":", 1)
            limit = Limit(float(rate), int(burst))
        except ValueError:
            raise InvalidInput(
                f"MC_RATE_LIMIT_TENANTS: {entry!r} is not tenant=rate:burst"
            ) from None
        if not tenant.strip() or limit.rate < 0 or limit.burst < 1 or not math.isfinite(limit.rate):
            raise InvalidInput(f"MC_RATE_LIMIT_TENANTS: {entry!r} is not tenant=rate:burst")
        out[tenant.strip()] = limit
    return out


class RateLimiter:
    """The buckets of every key and tenant seen lately, and the rule that spends them."""

    def __init__(
        self,
        per_key: Limit,
        per_tenant: Limit,
        tenants: dict[str, Limit] | None = None,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.per_key = per_key
        self.per_tenant = per_tenant
        self.tenants = dict(tenants or {})
        self._buckets: LRUCache[tuple[str, str], _Bucket] = LRUCache(max_buckets)

    def tenant_limit(self, tenant_id: str) -> Limit:
        """The tenant's own limit if it has one, else the default."""
        return self.tenants.get(tenant_id, self.per_tenant)

    def _bucket(self, scope: str, subject: str, limit: Limit, now: float) -> _Bucket:
        bucket = self._buckets.get((scope, subject))
        if bucket is None:
            bucket = self._buckets[(scope, subject)] = _Bucket(float(limit.burst), now)
        else:
            bucket.refill(limit, now)
        return bucket

    def take(self, tenant_id: str, key_id: str, now: float) -> Refusal | None:
        """Spend one token of the key's bucket and one of the tenant's, or spend nothing and
        say which limit refused (the one that frees up last)."""
        checks = [
            (KEY, key_id, self.per_key),
            (TENANT, tenant_id, self.tenant_limit(tenant_id)),
        ]
        buckets = [
            (scope, subject, limit, self._bucket(scope, subject, limit, now))
            for scope, subject, limit in checks
            if limit.enabled
        ]
        waits = [(b.wait(limit), scope, subject, limit) for scope, subject, limit, b in buckets]
        refused = max((w for w in waits if w[0] > 0), default=None, key=lambda w: w[0])
        if refused is not None:
            wait, scope, subject, limit = refused
            return Refusal(scope, subject, limit, max(1, math.ceil(wait)))
        for _, _, _, bucket in buckets:
            bucket.tokens -= 1
        return None
