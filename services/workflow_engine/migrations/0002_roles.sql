-- workflow-engine logs in as mc_workflow_engine, which owns its schema. It reads events and
-- appends only to run streams (its registration's stream_categories). A later migration that
-- adds tables to this schema ends with the same hand-over call.
GRANT mc_eventstore_reader, mc_eventstore_appender TO mc_workflow_engine;
SELECT eventstore.hand_over_schema('workflow', 'mc_workflow_engine');
