-- The gateway logs in as mc_gateway, which owns its schema: only the gateway's role (or an
-- administrator) may read or write tenants and API keys. It appends only to tenant streams
-- (its registration's stream_categories) and reads no events.
--
-- A later migration that adds tables to this schema ends with the same hand-over call, which
-- makes mc_gateway their owner (until then the default privileges it sets give mc_gateway their
-- use).
GRANT mc_eventstore_appender TO mc_gateway;
SELECT eventstore.hand_over_schema('gateway', 'mc_gateway');
