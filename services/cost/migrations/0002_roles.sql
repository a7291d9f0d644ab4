-- cost logs in as mc_cost, which owns its schema. It reads events and appends only to cost and
-- price streams (its registration's stream_categories). A later migration that adds tables to
-- this schema ends with the same hand-over call.
GRANT mc_eventstore_reader, mc_eventstore_appender TO mc_cost;
SELECT eventstore.hand_over_schema('cost', 'mc_cost');
