-- Canary reloads and their impact-report webhooks.
--
-- canary_stats: what each replica counted for each arm of a canary (absolute totals, rewritten
-- by that replica; the sum over replicas judges the canary). A replica that dies keeps the row it
-- last wrote, so a canary in progress resumes after a restart with what was counted.
CREATE TABLE policy_admission.canary_stats (
    reload_id   text        NOT NULL,
    replica_id  text        NOT NULL,
    arm         text        NOT NULL CHECK (arm IN ('canary', 'stable')),
    tenant_id   text        NOT NULL,
    decisions   bigint      NOT NULL DEFAULT 0,
    denies      bigint      NOT NULL DEFAULT 0,
    errors      bigint      NOT NULL DEFAULT 0,
    latency     bigint[]    NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reload_id, replica_id, arm)
);

-- A tenant's webhook subscriptions. The secret signs each delivery (HMAC-SHA256); it is shown
-- once, at creation, and never leaves this table otherwise (not in events, logs or answers).
CREATE TABLE policy_admission.webhooks (
    tenant_id   text        NOT NULL,
    webhook_id  text        NOT NULL,
    url         text        NOT NULL,
    secret      text        NOT NULL,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, webhook_id)
);

-- The delivery outbox: one row per (reload outcome, subscription), written in the transaction of
-- the outcome's event, so no report is lost when a process dies; delivered at least once.
CREATE TABLE policy_admission.webhook_deliveries (
    delivery_id     text        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    webhook_id      text        NOT NULL,
    reload_id       text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON policy_admission.webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
