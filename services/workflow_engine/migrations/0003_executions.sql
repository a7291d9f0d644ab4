-- The engine's index of workflow executions: what the execution listing shows, and when each
-- execution must be looked at again (its earliest step deadline or retry). It is written in the
-- same transaction as the execution's events, so a restarted engine resumes every execution
-- that still has a deadline or a retry to honour; the events stay the system of record.

CREATE TABLE IF NOT EXISTS workflow.executions (
    tenant_id        text        NOT NULL,
    execution_id     text        NOT NULL,
    workflow_id      text        NOT NULL,
    workflow_version integer     NOT NULL,
    status           text        NOT NULL,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    wake_at          timestamptz,
    PRIMARY KEY (tenant_id, execution_id)
);

CREATE INDEX IF NOT EXISTS executions_wake ON workflow.executions (wake_at)
    WHERE wake_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_tenant_started
    ON workflow.executions (tenant_id, started_at DESC);

GRANT SELECT, INSERT, UPDATE ON workflow.executions TO mc_service;

-- The approval queue: steps waiting for people, rewritten with their execution's events.
CREATE TABLE IF NOT EXISTS workflow.approval_queue (
    tenant_id    text        NOT NULL,
    execution_id text        NOT NULL,
    step_id      text        NOT NULL,
    workflow_id  text        NOT NULL,
    risk_tier    text        NOT NULL,
    required     integer     NOT NULL,
    approvals    integer     NOT NULL,
    role         text        NOT NULL,
    requested_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, execution_id, step_id)
);

GRANT SELECT, INSERT, DELETE ON workflow.approval_queue TO mc_service;
