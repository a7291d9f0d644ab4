"""Process configuration, read from the environment (12-factor) with pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings shared by every service process.

    ``NATS_URL``, ``DATABASE_URL`` and ``CLICKHOUSE_URL`` point at external servers; ``mctl up``
    sets the first two to the embedded servers it started and leaves ``CLICKHOUSE_URL`` unset, in
    which case the projection service uses chDB under ``data_dir``.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://mc_service@127.0.0.1:5432/missioncontrol"
    clickhouse_url: str | None = None
    data_dir: Path = Field(default=Path("var/data"), alias="MC_DATA_DIR")
    service_name: str = Field(default="unknown", alias="MC_SERVICE")
    http_host: str = Field(default="127.0.0.1", alias="MC_HTTP_HOST")
    http_port: int = Field(default=0, alias="MC_HTTP_PORT")
    log_level: str = Field(default="info", alias="MC_LOG_LEVEL")
    policy_bundle_dir: Path | None = Field(default=None, alias="MC_POLICY_BUNDLE")
    admin_token: str | None = Field(default=None, alias="MC_ADMIN_TOKEN")
    # Load shedding: requests in flight above these bounds are refused at once (overloaded, 429).
    rpc_max_in_flight: int = Field(default=64, ge=1, alias="MC_RPC_MAX_IN_FLIGHT")
    gateway_max_in_flight_agent: int = Field(default=32, ge=1, alias="MC_GATEWAY_MAX_AGENT")
    gateway_max_in_flight_query: int = Field(default=16, ge=1, alias="MC_GATEWAY_MAX_QUERY")
    gateway_latency_target_ms: float = Field(
        default=250.0, gt=0, alias="MC_GATEWAY_LATENCY_TARGET_MS"
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
