"""A batch of envelopes as rows per ClickHouse table (no I/O).

:func:`project` carries run and incident fields forward from the state the caller passes in (rows
are whole-row upserts) and names the entities that received a late event for a re-fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import (
    AdmissionDecided,
    CostRecorded,
    PolicyBundleActivated,
    StepRecorded,
)
from services.audit_replay.domain.folds import (
    StepFacts,
    evolve_incident,
    evolve_run,
    fold_steps,
    incident_event_is_late,
    incident_key,
    run_event_is_late,
    run_key,
    safe_decode,
)
from services.audit_replay.domain.rows import (
    IncidentRow,
    Key,
    RunRow,
    cost_row,
    decision_row,
    event_row,
    policy_rows,
    step_row,
)


@dataclass
class Projection:
    """What :func:`project` produced for one batch."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[Key, RunRow] = field(default_factory=dict)
    """Runs whose state changed, at their new state."""
    incidents: dict[Key, IncidentRow] = field(default_factory=dict)
    """Incidents whose state changed, at their new state."""
    refold_runs: set[Key] = field(default_factory=set)
    """Runs that received a late event: their state must be re-folded from their stream."""
    refold_incidents: set[Key] = field(default_factory=set)
    """Incidents that received a late event: their state must be re-folded from their stream."""
    last_position: int = 0
    last_recorded_at: datetime | None = None

    def count(self) -> int:
        """Rows in all tables."""
        return sum(len(v) for v in self.rows.values())

    def apply_refolds(
        self, runs: Mapping[Key, RunRow], incidents: Mapping[Key, IncidentRow]
    ) -> None:
        """Take the re-folded states of :attr:`refold_runs`/:attr:`refold_incidents`.

        They replace whatever the batch folded for those entities (a re-fold covers every event
        of the stream, the batch's included), and the ``runs``/``incidents`` rows follow.
        """
        self.runs.update(runs)
        self.incidents.update(incidents)
        self.refold_runs -= runs.keys()
        self.refold_incidents -= incidents.keys()
        self.rows["runs"] = [asdict(r) for r in self.runs.values()]
        self.rows["incidents"] = [asdict(i) for i in self.incidents.values()]


def project(
    envs: Sequence[EventEnvelope],
    runs: Mapping[Key, RunRow],
    incidents: Mapping[Key, IncidentRow],
) -> Projection:
    """Rows per table for ``envs``, given the current state of the runs and incidents they touch.

    ``runs``/``incidents`` must hold the current state of every entity the batch folds into that
    already exists (the caller loads it); the result's ``runs``/``incidents`` hold the new states.
    A run or incident touched several times in the batch yields one row, at its final state.

    An event older than its entity's state and not provably folded in already is not folded
    (the fold assumes position order); the entity is named in ``refold_runs`` /
    ``refold_incidents`` instead, for the caller to re-fold from the event store and hand back
    through :meth:`Projection.apply_refolds`.
    """
    out = Projection(rows={t: [] for t in ("events", "steps", "decisions", "policies", "costs")})
    for env in envs:
        pos = env.position or 0
        out.rows["events"].append(event_row(env))
        if pos >= out.last_position:
            out.last_position = pos
            out.last_recorded_at = env.recorded_at
        rk, ik = run_key(env), incident_key(env)
        event = safe_decode(env)
        if event is None:
            continue
        if rk is not None:
            before = out.runs.get(rk) or runs.get(rk)
            if run_event_is_late(before, env):
                out.refold_runs.add(rk)
            else:
                after = evolve_run(before, env, event)
                if after is not None and after is not before:
                    out.runs[rk] = after
        if ik is not None:
            ibefore = out.incidents.get(ik) or incidents.get(ik)
            if incident_event_is_late(ibefore, env):
                out.refold_incidents.add(ik)
            else:
                iafter = evolve_incident(ibefore, env, event)
                if iafter is not None and iafter is not ibefore:
                    out.incidents[ik] = iafter
        if isinstance(event, StepRecorded):
            out.rows["steps"].append(step_row(env, event))
        elif isinstance(event, AdmissionDecided):
            out.rows["decisions"].append(decision_row(env, event))
        elif isinstance(event, CostRecorded):
            out.rows["costs"].append(cost_row(env, event))
        elif isinstance(event, PolicyBundleActivated) and event.environment == "production":
            # A tenant's sandbox bundle decides only sandbox runs: the policies listed are the
            # production ones.
            out.rows["policies"].extend(policy_rows(env, event))
    out.rows["runs"] = [asdict(r) for r in out.runs.values()]
    out.rows["incidents"] = [asdict(i) for i in out.incidents.values()]
    return out


def project_steps(steps: Sequence[StepFacts], runs: Mapping[Key, RunRow]) -> Projection:
    """The runs that recorded ``steps`` (in position order), folded: :func:`project` for bulk.

    Only runs are produced; the rows of ``mc.steps`` and ``mc.events`` are built by ClickHouse
    from the events' JSON. Runs with a late step are named in ``refold_runs``.
    """
    by_run: dict[Key, list[StepFacts]] = {}
    for s in steps:
        by_run.setdefault((s.tenant_id, s.run_id), []).append(s)
    out = Projection()
    for key, group in by_run.items():
        before = runs.get(key)
        after, late = fold_steps(before, group)
        if after is not None and after is not before:
            out.runs[key] = after
        if late:
            out.refold_runs.add(key)
    out.rows["runs"] = [asdict(r) for r in out.runs.values()]
    out.rows["incidents"] = []
    return out
