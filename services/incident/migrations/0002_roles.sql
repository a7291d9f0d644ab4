-- incident logs in as mc_incident, which owns its schema. It reads events and appends only to
-- incident streams (its registration's stream_categories). A later migration that adds tables
-- to this schema ends with the same hand-over call.
GRANT mc_eventstore_reader, mc_eventstore_appender TO mc_incident;
SELECT eventstore.hand_over_schema('incident', 'mc_incident');
