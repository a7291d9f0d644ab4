-- Budgets: caps per tenant, agent, workflow or execution, over calendar windows (day, month, in
-- the tenant's time zone) or over each execution. The budget.* events stay the system of record
-- of what was set; these tables are what dispatch reserves against, in the dispatch's own
-- transaction.

-- The budgets as set (a copy of the budget streams, written with each budget.set).
CREATE TABLE IF NOT EXISTS workflow.budgets (
    tenant_id  text        NOT NULL,
    budget_id  text        NOT NULL,
    scope      text        NOT NULL CHECK (scope IN ('tenant', 'agent', 'workflow', 'execution')),
    subject    text        NOT NULL,
    "window"   text        NOT NULL CHECK ("window" IN ('day', 'month', 'execution')),
    cap_usd    numeric     NOT NULL CHECK (cap_usd >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, budget_id)
);

-- The tenant's time zone for day and month windows (UTC when there is no row).
CREATE TABLE IF NOT EXISTS workflow.budget_settings (
    tenant_id text PRIMARY KEY,
    timezone  text NOT NULL
);

-- One row per budget and window: what is reserved by attempts still out and what was spent.
-- Dispatch adds a step's estimate to reserved_usd with a guarded upsert
-- (reserved_usd + spent_usd + estimate <= cap_usd), so the row lock makes it exact across
-- replicas. alerted_pct is the highest threshold already announced in this window.
CREATE TABLE IF NOT EXISTS workflow.budget_windows (
    tenant_id    text        NOT NULL,
    budget_id    text        NOT NULL,
    window_key   text        NOT NULL,
    cap_usd      numeric     NOT NULL,
    reserved_usd numeric     NOT NULL DEFAULT 0 CHECK (reserved_usd >= 0),
    spent_usd    numeric     NOT NULL DEFAULT 0,
    alerted_pct  smallint    NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, budget_id, window_key)
);

-- One row per dispatched attempt that reserved: which windows it holds, how much is still held,
-- and how many of its run's recorded steps have been costed (expected is set when the run ends;
-- the rest of the hold is released once every recorded step is costed).
CREATE TABLE IF NOT EXISTS workflow.budget_holds (
    tenant_id   text        NOT NULL,
    run_id      text        NOT NULL,
    budget_ids  text[]      NOT NULL,
    window_keys text[]      NOT NULL,
    held_usd    numeric     NOT NULL CHECK (held_usd >= 0),
    spent_usd   numeric     NOT NULL DEFAULT 0,
    costed      integer     NOT NULL DEFAULT 0,
    expected    integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, run_id)
);

-- The engine's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('workflow', 'mc_workflow_engine');
