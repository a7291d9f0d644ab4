-- GET /v1/diffs lists a tenant's diffs without computing them again: each row now keeps what
-- was compared (the two inputs' identities), the counts of its rows and who last asked for it.
-- A diff asked for again is the same row (same hash): it moves to the top of the listing, which
-- is ordered by requested_at; created_at stays the first time it was asked for.
--
-- Rows stored before this migration get their kind and, for bundles, the two digests from the
-- stored request; their summary and requester stay unknown (null) until the diff is asked for
-- again. An agent spec's identity is a hash computed in Python, so it is not backfilled here.

ALTER TABLE policy_admission.diffs
    ADD COLUMN kind         text CHECK (kind IN ('bundles', 'documents')),
    ADD COLUMN old_identity jsonb,
    ADD COLUMN new_identity jsonb,
    ADD COLUMN summary      jsonb,
    ADD COLUMN requested_by text,
    ADD COLUMN requested_at timestamptz;

UPDATE policy_admission.diffs SET
    kind = convert_from(request, 'UTF8')::jsonb ->> 'kind',
    requested_at = created_at;
UPDATE policy_admission.diffs SET
    old_identity = jsonb_build_object('bundle_digest', convert_from(request, 'UTF8')::jsonb ->> 'old_digest'),
    new_identity = jsonb_build_object('bundle_digest', convert_from(request, 'UTF8')::jsonb ->> 'new_digest')
WHERE kind = 'bundles';

ALTER TABLE policy_admission.diffs
    ALTER COLUMN requested_at SET DEFAULT now(),
    ALTER COLUMN requested_at SET NOT NULL;

CREATE INDEX diffs_recent ON policy_admission.diffs (tenant_id, requested_at DESC, diff_hash DESC);

SELECT eventstore.hand_over_schema('policy_admission', 'mc_policy_admission');
