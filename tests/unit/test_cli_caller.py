"""Which credentials a command open to API keys and people sends (``caller_headers``)."""

from __future__ import annotations

import pytest

from libs.runtime.cli_support import CliError
from services.gateway.workflow_cli import caller_headers

pytestmark = pytest.mark.unit

URL = "http://gateway.test"


def test_an_api_key_given_wins_over_a_person_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_TOKEN", "person-token")
    monkeypatch.setenv("MC_API_KEY", "env-key")
    assert caller_headers(URL, "flag-key", None, False, None) == {
        "Authorization": "Bearer flag-key"
    }


def test_a_person_token_is_sent_with_the_tenant_when_no_key_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MC_TOKEN", "person-token")
    monkeypatch.setenv("MC_API_KEY", "env-key")
    assert caller_headers(URL, None, None, False, "acme") == {
        "X-Tenant-Id": "acme",
        "Authorization": "Bearer person-token",
    }


def test_without_a_person_the_environment_key_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MC_TOKEN", raising=False)
    monkeypatch.setenv("MC_API_KEY", "env-key")
    assert caller_headers(URL, None, None, False, None) == {"Authorization": "Bearer env-key"}
    monkeypatch.delenv("MC_API_KEY")
    with pytest.raises(CliError, match="no API key"):
        caller_headers(URL, None, None, False, None)
