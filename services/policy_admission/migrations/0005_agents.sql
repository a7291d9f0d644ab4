-- The agent registry's read table: one row per agent, written in the transaction of the agent's
-- events (the streams <tenant>/policy/agent-<id> stay the system of record). Listings read it,
-- and every policy-admission replica loads a tenant's rows into memory when the change log
-- names the tenant, so admission knows each agent's state without a query per decision.

CREATE TABLE policy_admission.agents (
    tenant_id        text        NOT NULL,
    agent_id         text        NOT NULL,
    version          integer     NOT NULL CHECK (version >= 1),
    state            text        NOT NULL CHECK (state IN ('draft', 'sandbox', 'governed', 'disabled')),
    governed_version integer,
    disabled         text[]      NOT NULL DEFAULT '{}',
    spec_hash        text        NOT NULL,
    origin           text,
    name             text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, agent_id)
);

CREATE INDEX agents_by_update ON policy_admission.agents (tenant_id, updated_at DESC);

-- Agents' lifecycle changes are followed like activations, settings and exceptions.
ALTER TABLE policy_admission.changes DROP CONSTRAINT IF EXISTS changes_kind_check;
ALTER TABLE policy_admission.changes
    ADD CONSTRAINT changes_kind_check
    CHECK (kind IN ('activation', 'settings', 'exceptions', 'agents'));

-- policy-admission's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
