-- The engine's index of promotion requests: what the promotion listing shows and filters on,
-- and when a pending request's SLA runs out (the sweep escalates or expires it). It is written in
-- the same transaction as the request's events, which stay the system of record.

CREATE TABLE IF NOT EXISTS workflow.promotions (
    tenant_id       text        NOT NULL,
    promotion_id    text        NOT NULL,
    agent_id        text        NOT NULL,
    environment     text        NOT NULL,
    status          text        NOT NULL,
    requested_by    text        NOT NULL,
    approvers       text[]      NOT NULL DEFAULT '{}',
    named_approvers text[]      NOT NULL DEFAULT '{}',
    requested_at    timestamptz NOT NULL,
    expires_at      timestamptz,
    view            jsonb       NOT NULL,
    PRIMARY KEY (tenant_id, promotion_id)
);

CREATE INDEX IF NOT EXISTS promotions_tenant_requested
    ON workflow.promotions (tenant_id, requested_at DESC);
CREATE INDEX IF NOT EXISTS promotions_due
    ON workflow.promotions (expires_at) WHERE status = 'pending';

-- The engine's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('workflow', 'mc_workflow_engine');
