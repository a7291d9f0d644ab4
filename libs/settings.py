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
DEFAULT_DATABASE_URL = "postgresql://mc_service@127.0.0.1:5432/missioncontrol"


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
    service_db_password: SecretStr | None = Field(default=None, alias="MC_SERVICE_DB_PASSWORD")
    """Password ``mctl migrate`` / ``mctl up`` set on the ``mc_service`` role."""

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
