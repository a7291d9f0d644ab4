-- policy-admission logs in as mc_policy_admission. It has no tables of its own: it reads events
-- and appends only to decision and policy streams (its registration's stream_categories).
-- (Numbered 0002 like the other services' role migrations; there is no 0001.)
GRANT mc_eventstore_reader, mc_eventstore_appender TO mc_policy_admission;
