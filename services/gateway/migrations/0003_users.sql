-- People and what they may do, owned by the gateway; API keys gain scopes.
--
-- A user is one login (the embedded identity provider's, with an argon2 password hash; users of
-- an external OIDC provider need no row, but a row disables them too). Roles are held per tenant.
-- Nothing is deleted: a disabled user and a revoked grant keep their rows, and every change is
-- also recorded as an event in the store (user.*, api_key.*).

CREATE TABLE gateway.users (
    user_id       text PRIMARY KEY,
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

CREATE TABLE gateway.role_grants (
    user_id     text        NOT NULL REFERENCES gateway.users (user_id),
    tenant_id   text        NOT NULL REFERENCES gateway.tenants (tenant_id),
    role        text        NOT NULL CHECK (role IN ('viewer', 'operator', 'approver', 'admin')),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (user_id, tenant_id, role)
);

CREATE INDEX role_grants_tenant ON gateway.role_grants (tenant_id);

-- Keys issued before scopes existed keep every scope they had in effect.
ALTER TABLE gateway.api_keys
    ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['ingest', 'admit', 'read']
        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'admit', 'read']);

-- The gateway's role owns what it keeps (see 0002_roles).
SELECT eventstore.hand_over_schema('gateway', 'mc_gateway');
