"""ClickHouse schema of the projections: numbered DDL steps recorded in ``mc.schema_migrations``.

Every table is a ``ReplacingMergeTree`` whose sorting key is the entity's identity and whose
version column is the store position of the event that produced the row, so a redelivered event
is an upsert of the same row and an older event can never overwrite a newer one. Readers use
``FINAL`` so unmerged duplicates never show.

Everything here can be dropped and rebuilt from the event store (see ``handlers.rebuild``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.audit_replay.clickhouse import Clickhouse

DATABASE = "mc"
TS = "DateTime64(6, 'UTC')"
USD = "Nullable(Decimal(38, 10))"


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
)

TABLES: tuple[str, ...] = (
    "events",
    "runs",
    "steps",
    "decisions",
    "incidents",
    "policies",
    "costs",
    "projection_state",
)


async def migrate(ch: Clickhouse) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied now."""
    await ch.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    await ch.command(
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations ("
        f" version UInt32, name String, applied_at {TS}"
        ") ENGINE = ReplacingMergeTree ORDER BY version"
    )
    rows = await ch.query(f"SELECT version FROM {DATABASE}.schema_migrations FINAL")
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
    return applied


async def drop_all(ch: Clickhouse) -> None:
    """Drop every projection table and the migration record (for a rebuild)."""
    for table in (*TABLES, "schema_migrations"):
        await ch.command(f"DROP TABLE IF EXISTS {DATABASE}.{table} SYNC")
