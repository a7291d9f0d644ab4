-- Tenants and their API keys, owned by the gateway. Only the SHA-256 of each key's secret is kept.

CREATE SCHEMA IF NOT EXISTS gateway;

CREATE TABLE gateway.tenants (
    tenant_id   text PRIMARY KEY,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.api_keys (
    key_id      text PRIMARY KEY,
    tenant_id   text        NOT NULL REFERENCES gateway.tenants (tenant_id),
    secret_hash bytea       NOT NULL CHECK (octet_length(secret_hash) = 32),
    name        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_tenant ON gateway.api_keys (tenant_id);

-- The gateway verifies keys; `mctl tenant` (as any role) creates tenants and issues or revokes
-- keys. Tenants are never deleted (their events stay in the store), keys are revoked, not deleted.
GRANT USAGE ON SCHEMA gateway TO mc_service;
GRANT SELECT, INSERT ON gateway.tenants TO mc_service;
GRANT SELECT, INSERT, UPDATE (revoked_at, name) ON gateway.api_keys TO mc_service;
