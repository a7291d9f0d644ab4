"""Process configuration, read from the environment (12-factor) with pydantic-settings.

This is the only place that reads Mission Control's environment variables; everything else is
handed a :class:`Settings`. URLs that may carry a password and the operator token are
:class:`~pydantic.SecretStr`: printing a settings object, logging it or putting it in an error
shows ``**********``, and the raw value has to be asked for with ``get_secret_value()``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.errors import InvalidInput

DEFAULT_DATA_DIR = Path("var/mc")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/missioncontrol"


class Settings(BaseSettings):
    """Settings shared by every process: the services, the relay, the supervisor and ``mctl``.

    ``NATS_URL``, ``DATABASE_URL`` and ``CLICKHOUSE_URL`` point at external servers; ``mctl up``
    starts embedded NATS and PostgreSQL for those of the first two that are not set (see
    :meth:`configured`), hands their URLs to the services, and leaves ``CLICKHOUSE_URL`` unset,
    in which case the projection service uses chDB under ``data_dir``. A service started on its
    own without them uses the defaults (servers on their standard local ports).
    """

    # An empty variable (``DATABASE_URL=``) means "not set", as it does for a shell user.
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", env_ignore_empty=True)

    nats_url: str = DEFAULT_NATS_URL
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    database_admin_url: SecretStr | None = None
    """A role that may run migrations and manage tenants (default: ``database_url``)."""
    clickhouse_url: SecretStr | None = None
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, alias="MC_DATA_DIR")
    service_name: str = Field(default="unknown", alias="MC_SERVICE")
    http_host: str = Field(default="127.0.0.1", alias="MC_HTTP_HOST")
    http_port: int = Field(default=0, alias="MC_HTTP_PORT")
    log_level: str = Field(default="info", alias="MC_LOG_LEVEL")
    policy_bundle_dir: Path | None = Field(default=None, alias="MC_POLICY_BUNDLE")
    admin_token: SecretStr | None = Field(default=None, alias="MC_ADMIN_TOKEN")
    db_role_passwords: SecretStr | None = Field(default=None, alias="MC_DB_ROLE_PASSWORDS")
    """The passwords of the services' PostgreSQL roles, a JSON object of role name to password
    (``{"mc_gateway": "...", ...}``). ``mctl migrate`` / ``mctl up`` set them on the roles, and
    ``mctl up`` hands each process its own; without it ``mctl up`` generates them into the data
    directory (see :mod:`libs.runtime.pg_credentials`)."""

    # Human identities (services/gateway/tokens.py). The gateway always accepts the tokens it
    # issues itself (``POST /v1/auth/token``); with an issuer and a JWKS it also accepts an
    # external OIDC provider's.
    oidc_issuer: str | None = Field(default=None, alias="MC_OIDC_ISSUER")
    """``iss`` of the external provider's tokens (unset: only the gateway's own are accepted)."""
    oidc_audience: str | None = Field(default=None, alias="MC_OIDC_AUDIENCE")
    """``aud`` the external provider's tokens must carry (required with an issuer)."""
    oidc_jwks_url: str | None = Field(default=None, alias="MC_OIDC_JWKS_URL")
    oidc_jwks_file: Path | None = Field(default=None, alias="MC_OIDC_JWKS_FILE")
    """The provider's signing keys: a JWKS URL (fetched and cached) or a JWKS file."""
    oidc_roles_claim: str = Field(default="mc_roles", min_length=1, alias="MC_OIDC_ROLES_CLAIM")
    """The claim that carries the roles per tenant (docs/rbac.md)."""
    auth_token_ttl_s: int = Field(default=900, ge=30, le=86_400, alias="MC_AUTH_TOKEN_TTL_S")
    """Lifetime of the tokens the gateway issues."""
    auth_signing_key_file: Path | None = Field(default=None, alias="MC_AUTH_SIGNING_KEY_FILE")
    """The gateway's token signing key (default: ``<data dir>/gateway/auth-signing-key.pem``,
    generated at first start, mode 0600)."""

    anchor_signing_key: SecretStr | None = Field(default=None, alias="MC_ANCHOR_SIGNING_KEY")
    """ed25519 private key (PEM, PKCS#8) the relay signs the event store's checkpoints with.
    ``mctl up`` generates one in ``<data dir>/anchor/signing.key`` (mode 0600) and hands it to
    the relay; without one the relay writes no checkpoints."""
    evidence_signing_key: SecretStr | None = Field(default=None, alias="MC_EVIDENCE_SIGNING_KEY")
    """ed25519 private key (PEM, PKCS#8) the audit service signs evidence documents with
    (docs/evidence.md); without one it uses ``<data dir>/evidence/signing.key``, generated on
    first use, whose ``signing.pub`` beside it is the key auditors verify with."""
    anchor_interval_s: float = Field(default=60.0, gt=0, alias="MC_ANCHOR_INTERVAL")
    """Seconds between two checkpoints (a round where no stream moved writes none)."""
    anchor_public_key: Path | None = Field(default=None, alias="MC_ANCHOR_PUBLIC_KEY")
    """PEM file of the public key ``mctl verify`` checks checkpoint signatures with (default:
    ``<data dir>/anchor/signing.pub`` when it exists)."""

    policy_drift_interval_s: float = Field(default=600.0, gt=0, alias="MC_POLICY_DRIFT_INTERVAL")
    """Seconds between two comparisons of each tenant's sandbox and production policy."""

    replicas: str = Field(default="", alias="MC_REPLICAS")
    """How many processes of a service ``mctl up`` runs, ``name=N,...`` (unnamed services: one);
    parsed and checked by the supervisor, which knows the registered services."""

    # Load shedding: requests in flight above these bounds are refused at once (overloaded, 429).
    rpc_max_in_flight: int = Field(default=64, ge=1, alias="MC_RPC_MAX_IN_FLIGHT")
    gateway_max_in_flight_agent: int = Field(default=32, ge=1, alias="MC_GATEWAY_MAX_AGENT")
    gateway_max_in_flight_query: int = Field(default=16, ge=1, alias="MC_GATEWAY_MAX_QUERY")
    gateway_latency_target_ms: float = Field(
        default=250.0, gt=0, alias="MC_GATEWAY_LATENCY_TARGET_MS"
    )
    # Live event streams (SSE, services/gateway/live.py): open streams per process and per tenant,
    # and the seconds of silence after which a heartbeat comment is sent.
    sse_max_streams: int = Field(default=256, ge=1, alias="MC_SSE_MAX_STREAMS")
    sse_max_streams_per_tenant: int = Field(default=16, ge=1, alias="MC_SSE_MAX_STREAMS_PER_TENANT")
    sse_heartbeat_s: float = Field(default=15.0, ge=1, le=60, alias="MC_SSE_HEARTBEAT_S")
    # audit-replay's answers of the console's reads (services/audit_replay/answers.py): the
    # megabytes kept (0: nothing kept, nothing shared), and how old an aggregate's answer may be
    # once the projections moved (0: only while they have not).
    answer_cache_mb: int = Field(default=64, ge=0, le=16_384, alias="MC_ANSWER_CACHE_MB")
    analytics_max_staleness_ms: int = Field(
        default=1000, ge=0, le=60_000, alias="MC_ANALYTICS_MAX_STALENESS_MS"
    )

    # --- NATS credentials (libs/runtime/busauth.py) ---------------------------------------------
    # Each process connects as a NATS user of its own. ``mctl up`` points each child at its
    # password file; in Kubernetes NATS_PASSWORD comes from a Secret.
    nats_user: str | None = Field(default=None, alias="NATS_USER")
    nats_password: SecretStr | None = Field(default=None, alias="NATS_PASSWORD")
    nats_password_file: Path | None = Field(default=None, alias="NATS_PASSWORD_FILE")
    """A file holding the password (mode 0600); takes precedence over ``NATS_PASSWORD``."""
    nats_credentials_dir: Path | None = Field(default=None, alias="MC_NATS_CREDENTIALS_DIR")
    """With an external ``NATS_URL``: the directory of password files, one per NATS user and
    named after it (``mctl nats-users`` writes one), from which ``mctl up`` gives each
    process its own."""

    def nats_credentials(self) -> tuple[str, SecretStr] | None:
        """The NATS user and password this process connects with (``None``: no user given).

        A user without a password (or the reverse) is a configuration mistake, refused here with
        :class:`~libs.errors.InvalidInput` naming the variables, never their values.
        """
        password = self.nats_password
        if self.nats_password_file is not None:
            password = read_password_file(self.nats_password_file, "NATS_PASSWORD_FILE")
        if self.nats_user and password is not None:
            return self.nats_user, password
        if self.nats_user or password is not None:
            raise InvalidInput(
                "NATS_USER and NATS_PASSWORD (or NATS_PASSWORD_FILE) are set together or not at all"
            )
        return None

    # --- end of NATS credentials ---

    # Rate limits: token buckets per API key and per tenant (requests per second refilled, and
    # the burst a bucket holds); above them the gateway answers 429 with Retry-After. 0 turns a
    # limit off. MC_RATE_LIMIT_TENANTS overrides the tenant limit per tenant: "acme=50:100,...".
    rate_limit_key_rps: float = Field(default=200.0, ge=0, alias="MC_RATE_LIMIT_KEY_RPS")
    rate_limit_key_burst: int = Field(default=400, ge=1, alias="MC_RATE_LIMIT_KEY_BURST")
    rate_limit_tenant_rps: float = Field(default=500.0, ge=0, alias="MC_RATE_LIMIT_TENANT_RPS")
    rate_limit_tenant_burst: int = Field(default=1000, ge=1, alias="MC_RATE_LIMIT_TENANT_BURST")
    rate_limit_tenants: str = Field(default="", alias="MC_RATE_LIMIT_TENANTS")

    def configured(self, name: str) -> bool:
        """Whether the field ``name`` was given (environment or constructor), not defaulted."""
        if name not in type(self).model_fields:
            raise KeyError(name)
        return name in self.model_fields_set


def read_password_file(path: Path, what: str) -> SecretStr:
    """The password kept in the file ``path`` (without the trailing newline an editor or
    ``kubectl`` leaves). An error names ``what`` and the file, never its content."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidInput(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not text:
        raise InvalidInput(f"{what}: {path} is empty")
    return SecretStr(text)


def load_settings() -> Settings:
    """The settings as the environment says now.

    A bad value raises :class:`~libs.errors.InvalidInput` naming each variable and what is wrong
    with it, never the value itself (it may be a secret).
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidInput(f"invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings of a long-running process, read once.

    Commands that may run several times in one process (``mctl`` under a test runner) call
    :func:`load_settings` instead, so they see the environment as it is now.
    """
    return load_settings()
