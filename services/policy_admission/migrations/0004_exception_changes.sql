-- Policy exceptions (waivers) are followed like activations and settings: every grant,
-- revocation and expiry adds a row to the change log every replica polls.

ALTER TABLE policy_admission.changes DROP CONSTRAINT IF EXISTS changes_kind_check;
ALTER TABLE policy_admission.changes
    ADD CONSTRAINT changes_kind_check CHECK (kind IN ('activation', 'settings', 'exceptions'));
