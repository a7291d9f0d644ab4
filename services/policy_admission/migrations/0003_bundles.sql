-- Tenants' uploaded policy bundles. What happened to them (uploaded, activated, the signing keys,
-- the settings) is recorded as events in the store, the system of record; this schema keeps the
-- archives themselves, content-addressed by their sha256, and a log of the changes every
-- policy-admission replica follows to apply activations and settings without a restart.

CREATE SCHEMA IF NOT EXISTS policy_admission;

CREATE TABLE policy_admission.bundle_archives (
    tenant_id   text        NOT NULL,
    digest      text        NOT NULL CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    archive     bytea       NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, digest)
);

-- One row per activation or settings change, written in the transaction of its event. Writers
-- take one advisory lock first, so rows become visible in seq order and a reader following
-- "seq > last seen" misses none.
CREATE TABLE policy_admission.changes (
    seq         bigserial   PRIMARY KEY,
    tenant_id   text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('activation', 'settings')),
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- policy-admission's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
