"""ClickHouse schema of the projections: numbered DDL steps recorded in ``mc.schema_migrations``.

Every table is a ``ReplacingMergeTree`` whose sorting key is the entity's identity and whose
version column is the store position of the event that produced the row, so a redelivered event
is an upsert of the same row and an older event can never overwrite a newer one. Readers use
``FINAL`` so unmerged duplicates never show.

Everything here can be dropped and rebuilt from the event store (see ``handlers.rebuild``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.audit_replay.clickhouse import TENANT_SETTING, Clickhouse

DATABASE = "mc"
TS = "DateTime64(6, 'UTC')"
USD = "Nullable(Decimal(38, 10))"


# An envelope as JSON (``EventEnvelope.model_dump_json``); its objects are read as JSON text.
INBOX_COLUMNS = (
    "position UInt64, event_id String, event_type String, schema_version UInt32, "
    "tenant_id String, stream_id String, stream_version UInt64, occurred_at String, "
    "recorded_at Nullable(String), correlation_id String, causation_id Nullable(String), "
    "actor String, trace_context String, payload String"
)
INBOX_FORMAT_SETTINGS = {
    "input_format_json_read_objects_as_strings": 1,
    "input_format_skip_unknown_fields": 1,
}
"""Settings of an insert into the inbox."""
INBOX_EVENT_TYPES: dict[str, frozenset[int]] = {
    "run.step_recorded": frozenset({1, 2, 3}),
    "cost.recorded": frozenset({2}),
}
"""The event types (and the schema versions) the inbox views turn into rows (run.step_recorded
v2 adds ``irregularities``, which the steps view reads, and v3 only usage fields no step row
reads; a cost.recorded v1, read again only by a rebuild, takes the Python path, whose upcaster
gives its cache and reasoning components their zeros)."""
_TS = "parseDateTime64BestEffort(occurred_at, 6, 'UTC') AS occurred_at"
_TRACEPARENT = "JSONExtract(trace_context, 'traceparent', 'Nullable(String)')"
# The same rows as ``domain.rows``: event_row, step_row and cost_row.
INBOX_EVENT_ROW = (
    "position, event_id, tenant_id, stream_id, stream_version, event_type, schema_version, "
    f"{_TS}, parseDateTime64BestEffortOrNull(recorded_at, 6, 'UTC') AS recorded_at, "
    "correlation_id, causation_id, actor, "
    f"if(length(splitByChar('-', ifNull({_TRACEPARENT}, ''))) >= 4, "
    f"splitByChar('-', ifNull({_TRACEPARENT}, ''))[2], NULL) AS trace_id, payload"
)
INBOX_STEP_ROW = (
    "tenant_id, JSONExtractString(payload, 'run_id') AS run_id, "
    "JSONExtractInt(payload, 'step_index') AS step_index, "
    "JSONExtractString(payload, 'kind') AS kind, "
    "JSONExtract(payload, 'model', 'Nullable(String)') AS model, "
    "JSONExtract(payload, 'tool', 'Nullable(String)') AS tool, "
    "JSONExtractString(payload, 'status') AS status, "
    "JSONExtractUInt(payload, 'input_tokens') AS input_tokens, "
    "JSONExtractUInt(payload, 'output_tokens') AS output_tokens, "
    "JSONExtractFloat(payload, 'duration_ms') AS duration_ms, "
    "if(JSONHas(payload, 'input'), JSONExtractRaw(payload, 'input'), 'null') AS input, "
    "if(JSONHas(payload, 'output'), JSONExtractRaw(payload, 'output'), 'null') AS output, "
    f"JSONExtract(payload, 'error', 'Nullable(String)') AS error, {_TS}, event_id, "
    "position AS version"
)
# Since migration 17 the steps view also carries the step's marks (run.step_recorded v2; a v1
# event has none, and JSONExtract of a missing key reads an empty array).
INBOX_STEP_ROW_MARKED = (
    INBOX_STEP_ROW + ", JSONExtract(payload, 'irregularities', 'Array(String)') AS irregularities"
)
# Migration 14's view, replaced by migration 21's (kept as it was applied).
INBOX_COST_ROW_V1 = (
    "tenant_id, JSONExtractString(payload, 'cost_id') AS cost_id, "
    "JSONExtractString(payload, 'run_id') AS run_id, "
    "JSONExtractString(payload, 'agent_id') AS agent_id, "
    "JSONExtractInt(payload, 'step_index') AS step_index, "
    "JSONExtract(payload, 'model', 'Nullable(String)') AS model, "
    "JSONExtractUInt(payload, 'input_tokens') AS input_tokens, "
    "JSONExtractUInt(payload, 'output_tokens') AS output_tokens, "
    "JSONExtractString(payload, 'pricing_status') AS pricing_status, "
    + ", ".join(
        f"toDecimal128OrNull(JSONExtract(payload, '{c}', 'Nullable(String)'), 10) AS {c}"
        for c in ("input_cost_usd", "output_cost_usd", "total_cost_usd")
    )
    + ", JSONExtractString(payload, 'price_table_version') AS price_table_version, "
    f"{_TS}, position AS version"
)
# The columns cost.recorded v2 added to ``mc.costs`` (migration 16).
COST_TOKEN_COLUMNS = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")
COST_USD_COLUMNS = (
    "cached_input_cost_usd",
    "cache_write_cost_usd",
    "reasoning_cost_usd",
    "provider_cost_usd",
    "cost_difference_usd",
)
INBOX_COST_ROW = (
    INBOX_COST_ROW_V1
    + "".join(f", JSONExtractUInt(payload, '{c}') AS {c}" for c in COST_TOKEN_COLUMNS)
    + "".join(
        f", toDecimal128OrNull(JSONExtract(payload, '{c}', 'Nullable(String)'), 10) AS {c}"
        for c in COST_USD_COLUMNS
    )
    + ", toUInt8(JSONExtractBool(payload, 'cost_mismatch')) AS cost_mismatch"
)
"""The ``mc.costs`` row of a ``cost.recorded`` v2 (the same row as ``domain.rows.cost_row``)."""


# The flat search row of any event (``mc.audit_events``), built by ClickHouse from a row of
# ``mc.events``: the ids every filter of an audit search reads, wherever the event type keeps
# them (a run's workflow and execution are labels of its ``run.started``; a decision names its
# policies in its reasons), and the lower-cased text full-text search reads: reasons, messages,
# titles, errors and a step's input and output. A field an event type does not have reads ''.
def _field(name: str) -> str:
    return f"JSONExtractString(payload, '{name}')"


def _label(name: str) -> str:
    return (
        f"if(JSONHas(payload, '{name}'), {_field(name)}, "
        f"JSONExtractString(payload, 'labels', '{name}')) AS {name}"
    )


def _raw(name: str) -> str:
    return f"if(JSONHas(payload, '{name}'), JSONExtractRaw(payload, '{name}'), '')"


AUDIT_EVENT_ROW = (
    "tenant_id, occurred_at, event_id, position, event_type, stream_id, actor, "
    f"{_field('run_id')} AS run_id, "
    # run.started v1 named the agent ``agent``.
    f"if(JSONHas(payload, 'agent_id'), {_field('agent_id')}, {_field('agent')}) AS agent_id, "
    f"{_label('workflow_id')}, {_label('execution_id')}, "
    f"arrayDistinct(arrayFilter(p -> p != '', arrayConcat([{_field('policy_id')}], "
    "arrayMap(r -> JSONExtractString(r, 'policy_id'), JSONExtractArrayRaw(payload, 'reasons')))"
    ")) AS policy_ids, "
    f"{_field('outcome')} AS outcome, {_field('incident_id')} AS incident_id, "
    "lowerUTF8(arrayStringConcat(arrayFilter(t -> t NOT IN ('', '[]', 'null', '{}'), ["
    + ", ".join(_field(f) for f in ("reason", "message", "title", "error", "resolution"))
    + ", "
    + ", ".join(_raw(f) for f in ("reasons", "input", "output"))
    + "]), ' ')) AS text"
)
AUDIT_EVENT_COLUMNS = (
    "tenant_id, occurred_at, event_id, position, event_type, stream_id, actor, run_id, "
    "agent_id, workflow_id, execution_id, policy_ids, outcome, incident_id, text"
)
# Skip indexes of the search table: a bloom filter per id column (a granule is read only if it
# may hold the id), a set of the few outcomes, and a text (inverted) index over the text, which
# ``hasToken`` uses. The text index needs ClickHouse 26.2 or newer (chDB 4.4 is 26.9); a token
# bloom filter (tokenbf_v1) answered the same searches several times slower over 10 M events,
# since every search read its whole filter (25 MiB), see docs/benchmarks.md.
AUDIT_INDEXES = (
    *(
        f"INDEX {c}_bf {c} TYPE bloom_filter(0.01) GRANULARITY 1"
        for c in ("run_id", "agent_id", "workflow_id", "execution_id", "incident_id", "actor")
    ),
    "INDEX policy_ids_bf policy_ids TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX outcome_set outcome TYPE set(16) GRANULARITY 1",
    "INDEX text_tokens text TYPE text(tokenizer = splitByNonAlpha)",
)


def audit_events_ddl(database: str = "mc") -> str:
    """The search table (also what the benchmark loads)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.audit_events ("
        f"tenant_id String, occurred_at {TS}, event_id String, position UInt64, "
        "event_type LowCardinality(String), stream_id String, actor String, run_id String, "
        "agent_id String, workflow_id String, execution_id String, policy_ids Array(String), "
        "outcome LowCardinality(String), incident_id String, text String, "
        + ", ".join(AUDIT_INDEXES)
        # Sorted as searches page (newest first within a tenant), so a page reads in order and
        # stops at its limit; versioned by position like mc.events, so a redelivery is an upsert.
        + ") ENGINE = ReplacingMergeTree(position) ORDER BY (tenant_id, occurred_at, event_id)"
        # Granules of 2,048 rows rather than 8,192: an id spread thinly over the log (an actor,
        # a policy, a rare word) costs a quarter of the rows read per match.
        " SETTINGS index_granularity = 2048"
    )


@dataclass(frozen=True)
class Migration:
    """One numbered DDL statement."""

    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.events (
            position UInt64, event_id String, tenant_id String, stream_id String,
            stream_version UInt64, event_type String, schema_version UInt32,
            occurred_at {TS}, recorded_at Nullable({TS}), correlation_id String,
            causation_id Nullable(String), actor String, trace_id Nullable(String),
            payload String
        ) ENGINE = ReplacingMergeTree(position) ORDER BY (tenant_id, position)""",
    ),
    Migration(
        2,
        "runs",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.runs (
            tenant_id String, run_id String, agent_id String, status LowCardinality(String),
            started_at Nullable({TS}), ended_at Nullable({TS}), stopped_at_step Nullable(Int64),
            violation_policy_id Nullable(String), violation_decision_id Nullable(String),
            stop_reason Nullable(String), last_step_index Int64, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, run_id)""",
    ),
    Migration(
        3,
        "steps",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.steps (
            tenant_id String, run_id String, step_index Int64, kind String,
            model Nullable(String), tool Nullable(String), status LowCardinality(String),
            input_tokens UInt64, output_tokens UInt64, duration_ms Float64,
            input String, output String, error Nullable(String), occurred_at {TS},
            event_id String, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, run_id, step_index)""",
    ),
    Migration(
        4,
        "decisions",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.decisions (
            tenant_id String, decision_id String, run_id String, step_index Int64,
            outcome LowCardinality(String), policy_ids Array(String), reasons String,
            bundle_digest String, context String, occurred_at {TS}, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, decision_id)""",
    ),
    Migration(
        5,
        "incidents",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.incidents (
            tenant_id String, incident_id String, violation_id String, run_id String,
            policy_id String, step_index Int64, severity LowCardinality(String),
            status LowCardinality(String), title String, trace_id Nullable(String),
            opened_at {TS}, acknowledged_at Nullable({TS}), acknowledged_by Nullable(String),
            resolved_at Nullable({TS}), resolved_by Nullable(String),
            resolution Nullable(String), version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, incident_id)""",
    ),
    Migration(
        6,
        "policies",
        # tenant_id is the tenant the bundle was activated for ("system" for the shared one),
        # so a tenant-specific bundle can never show in another tenant's answers.
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.policies (
            tenant_id String, bundle_digest String, policy_id String, title String,
            severity LowCardinality(String), runbook_url Nullable(String),
            description Nullable(String), activated_at {TS}, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, bundle_digest, policy_id)""",
    ),
    Migration(
        7,
        "costs",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.costs (
            tenant_id String, cost_id String, run_id String, agent_id String, step_index Int64,
            model Nullable(String), input_tokens UInt64, output_tokens UInt64,
            pricing_status LowCardinality(String), input_cost_usd {USD},
            output_cost_usd {USD}, total_cost_usd {USD}, price_table_version String,
            occurred_at {TS}, version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, cost_id)""",
    ),
    Migration(
        8,
        "projection_state",
        f"""CREATE TABLE IF NOT EXISTS {DATABASE}.projection_state (
            name String, position UInt64, recorded_at Nullable({TS})
        ) ENGINE = ReplacingMergeTree(position) ORDER BY name""",
    ),
    # How much of the entity's stream a run/incident row is known to have folded without a gap:
    # lets the projector tell a redelivery (ignored) from a late event (re-folded from the store).
    # Rows written before this column read 0, "not known", which only costs a re-fold.
    Migration(
        9,
        "runs_stream_version",
        f"ALTER TABLE {DATABASE}.runs ADD COLUMN IF NOT EXISTS stream_version UInt64 DEFAULT 0",
    ),
    Migration(
        10,
        "incidents_stream_version",
        f"ALTER TABLE {DATABASE}.incidents "
        "ADD COLUMN IF NOT EXISTS stream_version UInt64 DEFAULT 0",
    ),
    # The inbox takes bulk events as the envelope JSON they arrived in and ClickHouse turns them
    # into rows: parsing and row building in Python cost several times more CPU per event.
    Migration(
        11, "inbox", f"CREATE TABLE IF NOT EXISTS {DATABASE}.inbox ({INBOX_COLUMNS}) ENGINE = Null"
    ),
    Migration(
        12,
        "inbox_events",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.inbox_events TO {DATABASE}.events "
        f"AS SELECT {INBOX_EVENT_ROW} FROM {DATABASE}.inbox",
    ),
    Migration(
        13,
        "inbox_steps",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.inbox_steps TO {DATABASE}.steps "
        f"AS SELECT {INBOX_STEP_ROW} FROM {DATABASE}.inbox "
        "WHERE event_type = 'run.step_recorded'",
    ),
    Migration(
        14,
        "inbox_costs",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.inbox_costs TO {DATABASE}.costs "
        f"AS SELECT {INBOX_COST_ROW_V1} FROM {DATABASE}.inbox WHERE event_type = 'cost.recorded'",
    ),
    # A step recorded against the rules (without an allowed admission, twice, out of order)
    # shows its marks in the trace. Rows written before read an empty list.
    Migration(
        15,
        "steps_irregularities",
        f"ALTER TABLE {DATABASE}.steps "
        "ADD COLUMN IF NOT EXISTS irregularities Array(String) DEFAULT []",
    ),
    Migration(16, "inbox_steps_drop", f"DROP VIEW IF EXISTS {DATABASE}.inbox_steps"),
    Migration(
        17,
        "inbox_steps_marked",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.inbox_steps TO {DATABASE}.steps "
        f"AS SELECT {INBOX_STEP_ROW_MARKED} FROM {DATABASE}.inbox "
        "WHERE event_type = 'run.step_recorded'",
    ),
    # Cost by workflow: a run started for a workflow step carries its workflow id as a label.
    # Runs projected before this column read NULL until a rebuild.
    Migration(
        18,
        "runs_workflow_id",
        f"ALTER TABLE {DATABASE}.runs ADD COLUMN IF NOT EXISTS workflow_id Nullable(String)",
    ),
    # Exact cost: cache reads, cache writes and reasoning, each with its cost, and the
    # provider's own figure beside ours. Rows costed before read zero tokens and NULL component
    # costs (which sums skip) until a rebuild gives them their upcast zeros.
    Migration(
        19,
        "costs_components",
        f"ALTER TABLE {DATABASE}.costs "
        + "".join(f"ADD COLUMN IF NOT EXISTS {c} UInt64 DEFAULT 0, " for c in COST_TOKEN_COLUMNS)
        + "".join(f"ADD COLUMN IF NOT EXISTS {c} {USD}, " for c in COST_USD_COLUMNS)
        + "ADD COLUMN IF NOT EXISTS cost_mismatch UInt8 DEFAULT 0",
    ),
    # A view's SELECT cannot be altered: the cost view is replaced by one that reads v2 fields.
    Migration(20, "inbox_costs_drop_v1", f"DROP VIEW IF EXISTS {DATABASE}.inbox_costs"),
    Migration(
        21,
        "inbox_costs_v2",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.inbox_costs TO {DATABASE}.costs "
        f"AS SELECT {INBOX_COST_ROW} FROM {DATABASE}.inbox WHERE event_type = 'cost.recorded'",
    ),
    # Cost per execution and per step: a step attempt's run carries its execution and step ids
    # as labels (since its first run.started), like its workflow id. Runs projected before
    # these columns read NULL until a rebuild, which folds them from the same labels.
    Migration(
        22,
        "runs_execution_step",
        f"ALTER TABLE {DATABASE}.runs ADD COLUMN IF NOT EXISTS execution_id Nullable(String), "
        "ADD COLUMN IF NOT EXISTS step_id Nullable(String)",
    ),
    # Audit search: one flat row per event, fed by the raw log's inserts (both the Python path
    # and the inbox's view write mc.events, and a view on a view's target fires too), so it
    # follows the stream and every rebuild without a writer of its own. The backfill gives a
    # store projected before this migration its rows (an event the feed also wrote meanwhile is
    # the same row, an upsert).
    Migration(23, "audit_events", audit_events_ddl(DATABASE)),
    Migration(
        24,
        "audit_events_feed",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.audit_events_feed "
        f"TO {DATABASE}.audit_events AS SELECT {AUDIT_EVENT_ROW} FROM {DATABASE}.events",
    ),
    Migration(
        25,
        "audit_events_backfill",
        f"INSERT INTO {DATABASE}.audit_events ({AUDIT_EVENT_COLUMNS}) "
        f"SELECT {AUDIT_EVENT_ROW} FROM {DATABASE}.events FINAL",
    ),
    # Views for analysts (docs/clickhouse.md). Each reads its table with FINAL, so a
    # redelivered event is never counted twice; a cost without an amount is not zero, so sums
    # skip it and the views count such calls apart.
    Migration(
        26,
        "cost_by_model_day",
        f"CREATE VIEW IF NOT EXISTS {DATABASE}.cost_by_model_day AS "
        "SELECT tenant_id, toDate(occurred_at) AS day, ifNull(model, '') AS model, "
        "count() AS calls, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, "
        "countIf(pricing_status != 'priced' OR total_cost_usd IS NULL) AS unpriced_calls, "
        f"sum(total_cost_usd) AS cost_usd FROM {DATABASE}.costs FINAL "
        "GROUP BY tenant_id, day, model",
    ),
    Migration(
        27,
        "denials_by_policy",
        f"CREATE VIEW IF NOT EXISTS {DATABASE}.denials_by_policy AS "
        "SELECT tenant_id, policy_id, count() AS denials, uniqExact(run_id) AS runs, "
        "min(occurred_at) AS first_denied_at, max(occurred_at) AS last_denied_at "
        f"FROM {DATABASE}.decisions FINAL ARRAY JOIN policy_ids AS policy_id "
        "WHERE outcome = 'deny' GROUP BY tenant_id, policy_id",
    ),
    Migration(
        28,
        "incident_mttr",
        f"CREATE VIEW IF NOT EXISTS {DATABASE}.incident_mttr AS "
        "SELECT tenant_id, policy_id, severity, count() AS incidents, "
        "countIf(resolved_at IS NOT NULL) AS resolved, "
        "avgIfOrNull(dateDiff('second', opened_at, resolved_at), resolved_at IS NOT NULL) "
        "AS mttr_seconds, "
        "avgIfOrNull(dateDiff('second', opened_at, acknowledged_at), "
        "acknowledged_at IS NOT NULL) AS mtta_seconds "
        f"FROM {DATABASE}.incidents FINAL GROUP BY tenant_id, policy_id, severity",
    ),
    Migration(
        29,
        "top_agents_by_spend",
        f"CREATE VIEW IF NOT EXISTS {DATABASE}.top_agents_by_spend AS "
        "SELECT tenant_id, agent_id, uniqExact(run_id) AS runs, count() AS calls, "
        "sum(input_tokens + output_tokens) AS tokens, "
        "countIf(pricing_status != 'priced' OR total_cost_usd IS NULL) AS unpriced_calls, "
        f"sum(total_cost_usd) AS cost_usd FROM {DATABASE}.costs FINAL "
        "GROUP BY tenant_id, agent_id",
    ),
)

VIEWS: tuple[str, ...] = (
    "cost_by_model_day",
    "denials_by_policy",
    "incident_mttr",
    "top_agents_by_spend",
)
"""The analysts' views (docs/clickhouse.md)."""

TABLES: tuple[str, ...] = (
    # The views first: a view must go before the tables it reads or writes.
    *VIEWS,
    "audit_events_feed",
    "inbox_events",
    "inbox_steps",
    "inbox_costs",
    "inbox",
    "events",
    "runs",
    "steps",
    "decisions",
    "incidents",
    "policies",
    "costs",
    "projection_state",
    "audit_events",
)


TENANT_TABLES = (
    "runs",
    "steps",
    "decisions",
    "incidents",
    "policies",
    "costs",
    "audit_events",
)
"""The tables the queries read a tenant's rows from; on a server each has a row policy."""
ROW_POLICY = "mc_tenant_scope"


def row_policies() -> list[str]:
    """The row policies a ClickHouse server gets, one per table of :data:`TENANT_TABLES`.

    Each lets the service's user see only the rows of the tenants its query names in the
    custom setting :data:`~services.audit_replay.clickhouse.TENANT_SETTING` (which
    :meth:`~services.audit_replay.clickhouse.Clickhouse.select` sets from the same
    :class:`~services.audit_replay.clickhouse.TenantFilter` that builds the query's predicate).
    A query without it fails (``getSetting`` of an unset setting is an error) rather than read
    every tenant. Tenants come and go at run time, so one policy per table keyed by the query's
    tenants stands for a policy per tenant without DDL on every new tenant. Writes (inserts, the
    inbox views) are not filtered: row policies apply to reads.
    """
    return [
        f"CREATE ROW POLICY OR REPLACE {ROW_POLICY}_{table} ON {DATABASE}.{table} "
        f"FOR SELECT USING has(splitByChar(',', getSetting('{TENANT_SETTING}')), tenant_id) "
        "TO CURRENT_USER"
        for table in TENANT_TABLES
    ]


async def migrate(ch: Clickhouse) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied now.

    On a ClickHouse server it also (re)creates the tenant row policies (:func:`row_policies`);
    chDB has no users, so no row policies: there the one tenant predicate of every read is the
    whole control.
    """
    await ch.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    await ch.command(
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations ("
        f" version UInt32, name String, applied_at {TS}"
        ") ENGINE = ReplacingMergeTree ORDER BY version"
    )
    rows = await ch.query_all_tenants(f"SELECT version FROM {DATABASE}.schema_migrations FINAL")
    done = {int(r["version"]) for r in rows}
    applied: list[int] = []
    for m in MIGRATIONS:
        if m.version in done:
            continue
        await ch.command(m.sql)
        await ch.command(
            f"INSERT INTO {DATABASE}.schema_migrations (version, name, applied_at) "
            "VALUES ({version:UInt32}, {name:String}, now64(6))",
            {"version": m.version, "name": m.name},
        )
        applied.append(m.version)
    if not ch.embedded:
        for ddl in row_policies():
            await ch.command(ddl)
    return applied


async def drop_all(ch: Clickhouse) -> None:
    """Drop every projection table and the migration record (for a rebuild)."""
    for table in (*TABLES, "schema_migrations"):
        await ch.command(f"DROP TABLE IF EXISTS {DATABASE}.{table} SYNC")
