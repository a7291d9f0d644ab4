"""Pure projection and replay logic of the audit service (no I/O), one module per concern.

* :mod:`.rows`: the rows of each ClickHouse table (:class:`RunRow`, :class:`IncidentRow` and the
  per-event row builders).
* :mod:`.folds`: folding one event into a run or an incident, and telling a late event (re-fold
  the entity from its stream) from a redelivery (ignore it).
* :mod:`.projection`: a batch of envelopes as rows per table (:func:`project`).
* :mod:`.views`: answers shaped the same from ClickHouse rows or a replay fold (runs, incidents,
  traces and their inflection point).
* :mod:`.replay`: a run folded from the store's events up to a point.
* :mod:`.export`: a trace as CSV.
"""

from services.audit_replay.domain.export import CSV_COLUMNS, trace_csv
from services.audit_replay.domain.folds import (
    INCIDENT_EVENTS,
    RUN_EVENTS,
    StepFacts,
    evolve_incident,
    evolve_run,
    fold_steps,
    incident_event_is_late,
    incident_key,
    incident_stream,
    refold_incident,
    refold_run,
    run_event_is_late,
    run_key,
    run_stream,
    safe_decode,
)
from services.audit_replay.domain.projection import Projection, project, project_steps
from services.audit_replay.domain.replay import (
    ExecutionReplay,
    ReplayState,
    events_through_step,
    evolve_execution,
    evolve_replay,
    execution_replay_answer,
    replay_answer,
    step_of,
)
from services.audit_replay.domain.rows import (
    IncidentRow,
    Key,
    RunRow,
    cost_row,
    decision_row,
    dumps,
    event_row,
    parse_ts,
    policy_rows,
    step_row,
)
from services.audit_replay.domain.views import (
    cost_summary,
    decision_view,
    governing_decisions,
    incident_view,
    inflection_point,
    iso,
    run_totals,
    run_view,
    step_view,
    trace_steps,
    usd,
)

__all__ = [
    "CSV_COLUMNS",
    "INCIDENT_EVENTS",
    "RUN_EVENTS",
    "ExecutionReplay",
    "IncidentRow",
    "Key",
    "Projection",
    "ReplayState",
    "RunRow",
    "StepFacts",
    "cost_row",
    "cost_summary",
    "decision_row",
    "decision_view",
    "dumps",
    "event_row",
    "events_through_step",
    "evolve_execution",
    "evolve_incident",
    "evolve_replay",
    "evolve_run",
    "execution_replay_answer",
    "fold_steps",
    "governing_decisions",
    "incident_event_is_late",
    "incident_key",
    "incident_stream",
    "incident_view",
    "inflection_point",
    "iso",
    "parse_ts",
    "policy_rows",
    "project",
    "project_steps",
    "refold_incident",
    "refold_run",
    "replay_answer",
    "run_event_is_late",
    "run_key",
    "run_stream",
    "run_totals",
    "run_view",
    "safe_decode",
    "step_of",
    "step_row",
    "step_view",
    "trace_csv",
    "trace_steps",
    "usd",
]
