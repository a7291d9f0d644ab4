-- audit-replay records every compliance attestation it generates as an event in the tenant's
-- attestation streams (its registration's stream_categories), so it may now append.
GRANT mc_eventstore_appender TO mc_audit_replay;
