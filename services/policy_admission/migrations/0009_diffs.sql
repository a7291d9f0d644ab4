-- Diffs asked for through POST /v1/diffs: what was compared (two bundle digests, or two JSON
-- documents and the fields marked locked or enforced), by the diff's hash. The rows are
-- computed again from this on any replica that does not hold them in memory; a diff is pure,
-- so the same request always gives the same rows and hash.

CREATE TABLE policy_admission.diffs (
    tenant_id   text        NOT NULL,
    diff_hash   text        NOT NULL CHECK (diff_hash ~ '^sha256:[0-9a-f]{64}$'),
    request     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, diff_hash)
);

-- policy-admission's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
