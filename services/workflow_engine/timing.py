"""Where an execution's time went: each step's waits and running time, and the critical path.

A step's *span* runs from the moment it became ready (it asked for approval, or its first attempt
was dispatched, which for an ungated step happens in the transaction that ended its last
dependency) to the moment it ended, retries and their backoff included. Along a chain of steps
each of which became ready when the one before it ended, the spans add up to the chain's wall
time, so the longest path through the DAG weighted by spans is the chain that decided how long
the execution took: its *critical path*. Shortening any step on it shortens the execution;
shortening a step off it does not.

A step that has not ended weighs what it has taken so far (up to ``now``, or the execution's
end); one that never started weighs nothing: a definition gives no duration estimate, so an
unfinished execution's critical path is the chain that has cost the most time so far.

Nothing here does I/O; :func:`critical_path` is a pure function of the DAG and the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from graphlib import TopologicalSorter


@dataclass(frozen=True)
class StepTimes:
    """The instants that bound one step's waits and work (None: not reached)."""

    requested_at: datetime | None = None
    """When it asked for approval (gated steps only)."""
    started_at: datetime | None = None
    """When its first attempt was dispatched."""
    finished_at: datetime | None = None
    """When it ended (completed, failed for good, blocked or rejected)."""

    @property
    def ready_at(self) -> datetime | None:
        """When it became ready: its approval request, or else its first dispatch."""
        return self.requested_at or self.started_at

    def queued_ms(self, now: datetime) -> float | None:
        """Time from ready to first dispatch (the approval wait; 0 for an ungated step)."""
        if self.requested_at is None:
            return 0.0 if self.started_at is not None else None
        return _ms(self.requested_at, self.started_at or self.finished_at or now)

    def running_ms(self, now: datetime) -> float | None:
        """Time from first dispatch to the end (every attempt and backoff), or to ``now``."""
        if self.started_at is None:
            return None
        return _ms(self.started_at, self.finished_at or now)

    def span_ms(self, now: datetime) -> float:
        """Time from ready to the end, or to ``now``; 0 for a step that never became ready."""
        ready = self.ready_at
        return 0.0 if ready is None else _ms(ready, self.finished_at or now)


def _ms(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() * 1000)


def critical_path(
    depends_on: Mapping[str, Sequence[str]], weight_ms: Mapping[str, float]
) -> tuple[list[str], float]:
    """The heaviest chain of ``depends_on`` (step → its dependencies) and its total weight.

    Steps are taken in graphlib's topological order; each step's heaviest chain is its own
    weight plus the heaviest chain among its dependencies. Ties go to the dependency listed
    first, and between ending steps to the one first in ``depends_on``'s order, so the answer
    is the same on every call. A step missing from ``weight_ms`` weighs 0; a DAG whose steps
    all weigh 0 (nothing ran yet) has an empty critical path.
    """
    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for step in TopologicalSorter(depends_on).static_order():
        prior: str | None = None
        for dep in depends_on.get(step, ()):
            if prior is None or best[dep] > best[prior]:
                prior = dep
        best[step] = weight_ms.get(step, 0.0) + (best[prior] if prior is not None else 0.0)
        via[step] = prior
    end: str | None = None
    for step in depends_on:
        if end is None or best[step] > best[end]:
            end = step
    if end is None or best[end] <= 0:
        return [], 0.0
    path: list[str] = []
    node: str | None = end
    while node is not None:
        path.append(node)
        node = via[node]
    path.reverse()
    return path, best[end]
