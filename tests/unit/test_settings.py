"""One settings object, one URL resolver, and secrets that never show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from libs.errors import InvalidInput
from libs.runtime.cli import app
from libs.runtime.cli_support import CliError, admin_database, data_dir_of
from libs.runtime.pg_credentials import ensure_passwords
from libs.runtime.state import STATE_FILE
from libs.runtime.urls import Source, resolve_url
from libs.settings import DEFAULT_DATA_DIR, Settings, load_settings

pytestmark = pytest.mark.unit

ENV_VARS = (
    "NATS_URL",
    "DATABASE_URL",
    "DATABASE_ADMIN_URL",
    "CLICKHOUSE_URL",
    "MC_DATA_DIR",
    "MC_ADMIN_TOKEN",
    "MC_DB_ROLE_PASSWORDS",
)
EMBEDDED_ADMIN = "postgresql://postgres@127.0.0.1:5999/missioncontrol"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def running(tmp_path: Path) -> Path:
    """A data directory with the state file of a running ``mctl up`` on embedded servers."""
    state = {"postgres_admin_url": EMBEDDED_ADMIN, "nats_url": "nats://127.0.0.1:5998"}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    return tmp_path


def test_precedence_is_flag_then_environment_then_running_system(
    running: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = resolve_url("admin_database", data_dir=running)
    assert found is not None
    assert (found.secret(), found.source) == (EMBEDDED_ADMIN, Source.RUNNING_SYSTEM)

    monkeypatch.setenv("DATABASE_URL", "postgresql://svc@env-db/mc")
    found = resolve_url("admin_database", data_dir=running)
    assert found is not None
    assert (found.secret(), found.source) == ("postgresql://svc@env-db/mc", Source.ENVIRONMENT)

    monkeypatch.setenv("DATABASE_ADMIN_URL", "postgresql://admin@env-db/mc")
    found = resolve_url("admin_database", data_dir=running)
    assert found is not None
    assert found.secret() == "postgresql://admin@env-db/mc"

    found = resolve_url("admin_database", flag="postgresql://flag-db/mc", data_dir=running)
    assert found is not None
    assert (found.secret(), found.source) == ("postgresql://flag-db/mc", Source.FLAG)


def test_the_running_systems_admin_url_gets_its_password_from_the_data_directory(
    running: Path,
) -> None:
    """``state.json`` names the embedded server without a password; the password is read from
    the private credentials file beside it, and shown by no ``str``."""
    password = ensure_passwords(running, ["postgres"])["postgres"].get_secret_value()
    found = resolve_url("admin_database", data_dir=running)
    assert found is not None
    assert found.secret() == f"postgresql://postgres:{password}@127.0.0.1:5999/missioncontrol"
    assert password not in f"{found} {found!r}"


def test_nothing_configured_and_nothing_running_leaves_the_embedded_default(
    tmp_path: Path,
) -> None:
    for kind in ("nats", "database", "admin_database"):
        assert resolve_url(kind, data_dir=tmp_path) is None  # type: ignore[arg-type]
    with pytest.raises(CliError, match="no database: pass --database-url, set DATABASE_URL"):
        admin_database(None, tmp_path)


def test_the_supervisor_never_reads_a_state_file(running: Path) -> None:
    # Without data_dir (how the supervisor asks), a left-over state file is not a server.
    assert resolve_url("nats") is None
    found = resolve_url("nats", data_dir=running)
    assert found is not None
    assert found.secret() == "nats://127.0.0.1:5998"


def test_the_services_database_url_is_never_read_back_from_the_state_file(running: Path) -> None:
    # state.json records it redacted; the services get it from the supervisor's environment.
    assert resolve_url("database", data_dir=running) is None


def test_an_empty_variable_counts_as_unset(running: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("NATS_URL", "")
    assert not Settings().configured("database_url")
    found = resolve_url("admin_database", data_dir=running)
    assert found is not None
    assert found.source is Source.RUNNING_SYSTEM
    assert resolve_url("nats") is None


def test_configured_names_only_real_fields() -> None:
    with pytest.raises(KeyError):
        Settings().configured("no_such_setting")


def test_secrets_are_redacted_in_settings_and_resolved_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://svc:dbpass@db/mc")
    monkeypatch.setenv("DATABASE_ADMIN_URL", "postgresql://admin:adminpass@db/mc")
    monkeypatch.setenv("CLICKHOUSE_URL", "http://ch:chpass@ch:8123")
    monkeypatch.setenv("MC_ADMIN_TOKEN", "operator-token")
    monkeypatch.setenv("MC_DB_ROLE_PASSWORDS", '{"mc_gateway": "svcpass"}')
    settings = Settings()
    shown = f"{settings} {settings!r} {settings.model_dump()}"
    for secret in ("dbpass", "adminpass", "chpass", "operator-token", "svcpass"):
        assert secret not in shown
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "operator-token"
    found = resolve_url("admin_database", settings=settings)
    assert found is not None
    assert "adminpass" not in f"{found} {found!r}"
    assert str(found) == "postgresql://admin:***@db/mc (from the environment)"
    assert found.secret() == "postgresql://admin:adminpass@db/mc"


def test_the_data_dir_is_the_flag_else_mc_data_dir_else_var_mc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert data_dir_of(None) == DEFAULT_DATA_DIR.resolve()
    monkeypatch.setenv("MC_DATA_DIR", str(tmp_path / "env"))
    assert data_dir_of(None) == tmp_path / "env"
    assert data_dir_of(tmp_path / "flag") == tmp_path / "flag"


def test_mctl_reports_a_missing_database_without_echoing_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(app, ["verify", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no database" in result.output
    assert "Traceback" not in result.output

    # A database that refuses the connection: the error names the problem, not the password.
    monkeypatch.setenv("DATABASE_ADMIN_URL", "postgresql://admin:hunter2@127.0.0.1:1/mc")
    result = CliRunner().invoke(app, ["verify", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert "127.0.0.1" in result.output  # it did try the configured database
    assert "hunter2" not in result.output


def test_a_bad_setting_is_named_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_HTTP_PORT", "not-a-port")
    with pytest.raises(InvalidInput, match="invalid configuration: MC_HTTP_PORT: ") as caught:
        load_settings()
    assert "not-a-port" not in str(caught.value)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1
    assert result.output.startswith("error: invalid configuration: MC_HTTP_PORT")
    assert "Traceback" not in result.output
