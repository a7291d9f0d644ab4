-- Policy simulations: jobs that evaluate a candidate bundle against past decisions. A simulation
-- has no side effects on runs or decisions; this table keeps the job itself (its request, its
-- progress and, when done, its report), so a replica that dies mid-way leaves it to another:
-- a job whose heartbeat is older than its lease is taken over and run again from the start.

CREATE TABLE policy_admission.simulations (
    simulation_id text        PRIMARY KEY,
    tenant_id     text        NOT NULL,
    request       jsonb       NOT NULL,
    requested_by  text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    progress      jsonb       NOT NULL DEFAULT '{}',
    report        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX simulations_unfinished ON policy_admission.simulations (heartbeat_at)
    WHERE status IN ('queued', 'running');
CREATE INDEX simulations_by_tenant ON policy_admission.simulations (tenant_id, created_at);

SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
