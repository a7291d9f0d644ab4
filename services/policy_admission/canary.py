"""Canary reloads: which runs a candidate bundle decides for, what each replica measures, and the
judgement that promotes the candidate or rolls it back (pure, no I/O).

* :func:`in_canary` places a run by a stable hash of its id and the reload's id, so every step
  of a run is decided by the same bundle, and another reload samples other runs.
* :class:`Meter` counts, per reload and arm (``canary`` or ``stable``), decisions, denies,
  evaluation errors and a histogram of evaluation latency. It is updated on the decision path
  (dictionary arithmetic, no I/O); the replica writes its totals to
  ``policy_admission.canary_stats`` (one row per replica, reload and arm: absolute values, so a
  write repeated is harmless and a replica that died keeps what it counted).
* :func:`judge` reads the sum of every replica's rows against the reload's
  :class:`~libs.contracts.policy.CanaryPlan`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from libs.contracts.policy import CanaryPlan

Arm = Literal["canary", "stable"]
ARMS: tuple[Arm, ...] = ("canary", "stable")
BUCKETS = 10_000
"""A run's place is one of this many buckets; ``percent`` % of them are the canary's."""

# Latency histogram: bucket i holds evaluations up to LATENCY_BOUNDS_MS[i] (the last one: above
# every bound). Geometric, 25 % apart, from 10 microseconds to about 20 seconds.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(0.01 * 1.25**i for i in range(66))


def bucket_of(run_id: str, reload_id: str) -> int:
    """The run's bucket for one reload, 0 ≤ b < :data:`BUCKETS` (sha256: the same in every
    replica and every process)."""
    digest = hashlib.sha256(f"{reload_id}\x00{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_canary(run_id: str, reload_id: str, percent: int) -> bool:
    """Whether the candidate decides for ``run_id`` during the canary of ``reload_id``."""
    return bucket_of(run_id, reload_id) < percent * BUCKETS // 100


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of one evaluation's latency."""
    ms = seconds * 1000.0
    if ms <= LATENCY_BOUNDS_MS[0]:
        return 0
    i = math.ceil(math.log(ms / LATENCY_BOUNDS_MS[0], 1.25) - 1e-9)
    return min(max(i, 0), len(LATENCY_BOUNDS_MS))


@dataclass
class ArmStats:
    """What one arm of a canary did (in one replica, or summed over all)."""

    decisions: int = 0
    denies: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def observe(self, *, denied: bool, error: bool, seconds: float) -> None:
        """Count one evaluation (an error counts as a decision that did not come from this
        bundle)."""
        self.decisions += 1
        if error:
            self.errors += 1
            return
        if denied:
            self.denies += 1
        self.latency[latency_bucket(seconds)] += 1

    def add(self, other: ArmStats) -> None:
        """Add ``other``'s counts to these."""
        self.decisions += other.decisions
        self.denies += other.denies
        self.errors += other.errors
        for i, n in enumerate(other.latency[: len(self.latency)]):
            self.latency[i] += n

    @property
    def deny_rate(self) -> float:
        """Denies over the decisions this bundle made (errors excluded)."""
        made = self.decisions - self.errors
        return self.denies / made if made else 0.0

    @property
    def error_rate(self) -> float:
        """Evaluation errors over every evaluation tried."""
        return self.errors / self.decisions if self.decisions else 0.0

    def quantile_ms(self, q: float) -> float | None:
        """The upper bound (ms) of the bucket holding quantile ``q``; ``None`` without samples.
        Above the last bound: the last bound."""
        total = sum(self.latency)
        if total == 0:
            return None
        rank = math.ceil(q * total)
        seen = 0
        for i, n in enumerate(self.latency):
            seen += n
            if seen >= rank:
                return round(LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)], 4)
        return round(LATENCY_BOUNDS_MS[-1], 4)  # pragma: no cover - rank ≤ total

    def figures(self) -> dict[str, Any]:
        """The arm's part of an impact report."""
        return {
            "decisions": self.decisions,
            "denies": self.denies,
            "errors": self.errors,
            "deny_rate": round(self.deny_rate, 6),
            "error_rate": round(self.error_rate, 6),
            "p50_ms": self.quantile_ms(0.5),
            "p95_ms": self.quantile_ms(0.95),
        }


def summed(rows: Iterable[tuple[str, ArmStats]]) -> dict[Arm, ArmStats]:
    """The arms' totals over the rows of every replica (``(arm, stats)``)."""
    out: dict[Arm, ArmStats] = {arm: ArmStats() for arm in ARMS}
    for arm, stats in rows:
        if arm in out:
            out[arm].add(stats)
    return out


def report(arms: dict[Arm, ArmStats], elapsed_s: float) -> dict[str, Any]:
    """The impact report's figures: each arm and the deltas that judge the canary."""
    canary, stable = arms["canary"], arms["stable"]
    p95_c, p95_s = canary.quantile_ms(0.95), stable.quantile_ms(0.95)
    return {
        "canary": canary.figures(),
        "stable": stable.figures(),
        "deny_rate_delta": round(canary.deny_rate - stable.deny_rate, 6),
        "p95_delta_ms": (
            round(p95_c - p95_s, 4) if p95_c is not None and p95_s is not None else None
        ),
        "elapsed_s": round(elapsed_s, 3),
    }


@dataclass(frozen=True)
class Verdict:
    """A canary's outcome: ``promoted`` or ``rolled_back``, why, and the figures."""

    outcome: Literal["promoted", "rolled_back"]
    reason: str
    detail: str
    figures: dict[str, Any]


def judge(plan: CanaryPlan, arms: dict[Arm, ArmStats], elapsed_s: float) -> Verdict | None:
    """The verdict on a canary, or ``None`` while its window is still open.

    * Evaluation errors above the plan's budget (``max_error_rate`` of the window's
      ``min_decisions``, or of the decisions made if more) roll it back at once.
    * Once the canary made ``min_decisions`` decisions and ``min_seconds`` passed: rolled back
      if its deny rate exceeds the stable bundle's by more than ``max_deny_rate_delta``, or its
      p95 latency the stable one's by more than ``max_p95_delta_ms``; promoted otherwise. With
      no stable decisions to compare (a 100 % canary, or no traffic outside it) only the errors
      judge.
    """
    canary, stable = arms["canary"], arms["stable"]
    figures = report(arms, elapsed_s)
    budget = plan.max_error_rate * max(canary.decisions, plan.min_decisions)
    if canary.errors > budget:
        return Verdict(
            "rolled_back",
            "evaluation_errors",
            f"{canary.errors} evaluation errors in {canary.decisions} canary decisions "
            f"(at most {plan.max_error_rate:.2%} allowed)",
            figures,
        )
    if canary.decisions < plan.min_decisions or elapsed_s < plan.min_seconds:
        return None
    if stable.decisions - stable.errors > 0:
        delta = canary.deny_rate - stable.deny_rate
        if delta > plan.max_deny_rate_delta:
            return Verdict(
                "rolled_back",
                "deny_rate",
                f"deny rate {canary.deny_rate:.2%} against {stable.deny_rate:.2%} for the stable "
                f"bundle (+{delta:.2%}, at most +{plan.max_deny_rate_delta:.2%} allowed)",
                figures,
            )
        p95_delta = figures["p95_delta_ms"]
        if p95_delta is not None and p95_delta > plan.max_p95_delta_ms:
            return Verdict(
                "rolled_back",
                "latency",
                f"p95 evaluation latency {figures['canary']['p95_ms']} ms against "
                f"{figures['stable']['p95_ms']} ms (+{p95_delta} ms, at most "
                f"+{plan.max_p95_delta_ms} ms allowed)",
                figures,
            )
    return Verdict(
        "promoted",
        "window_passed",
        f"{canary.decisions} canary decisions over {elapsed_s:.0f} s within every bound",
        figures,
    )


class Meter:
    """This replica's counts per (reload, arm), updated on the decision path."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, Arm], ArmStats] = {}
        self.tenants: dict[str, str] = {}
        self.dirty: set[str] = set()

    def observe(
        self,
        tenant_id: str,
        reload_id: str,
        arm: Arm,
        *,
        denied: bool,
        error: bool,
        seconds: float,
    ) -> None:
        """Count one evaluation of ``arm`` in ``reload_id`` (of ``tenant_id``)."""
        self.tenants[reload_id] = tenant_id
        stats = self._stats.get((reload_id, arm))
        if stats is None:
            stats = self._stats[(reload_id, arm)] = ArmStats()
        stats.observe(denied=denied, error=error, seconds=seconds)
        self.dirty.add(reload_id)

    def of(self, reload_id: str) -> dict[Arm, ArmStats]:
        """This replica's arms of ``reload_id`` (copies of the counters)."""
        out: dict[Arm, ArmStats] = {}
        for arm in ARMS:
            stats = self._stats.get((reload_id, arm))
            if stats is not None:
                copy = ArmStats()
                copy.add(stats)
                out[arm] = copy
        return out

    def forget(self, reload_id: str) -> None:
        """Drop the counters of a finished reload."""
        for arm in ARMS:
            self._stats.pop((reload_id, arm), None)
        self.tenants.pop(reload_id, None)
        self.dirty.discard(reload_id)
