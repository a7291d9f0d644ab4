"""Tenant policy settings: the schema, versions and what reaches Rego (libs/contracts/policy.py,
tenant_bundles.change_settings, the gateway's If-Match reading, domain.admission_required_mode)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from libs.contracts.events import PolicySettingsChanged
from libs.contracts.policy import PolicySettings
from libs.errors import Conflict, InvalidInput
from services.gateway.policy_bundles import PolicySettingsIn, settings_payload
from services.policy_admission.domain import admission_required_mode
from services.policy_admission.tenant_bundles import Settings, change_settings


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens_per_run": -1},
        {"max_tokens_per_run": 10**12},
        {"max_cost_usd_per_run": "-0.01"},
        {"max_cost_usd_per_run": "0.0000001"},
        {"model_allowlist": ["gpt\x00-4o"]},
        {"model_allowlist": ["\ud800"]},
        {"model_allowlist": [""]},
        {"tool_allowlist": ["t"] * 501},
        {"admission_required": "off"},
        {"max_token_per_run": 5},
    ],
)
def test_invalid_settings_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PolicySettings.model_validate(body)


def test_settings_reach_rego_as_json_values() -> None:
    settings = PolicySettings(
        max_tokens_per_run=20000, max_cost_usd_per_run=Decimal("2.5"), model_allowlist=[]
    )
    assert settings.as_input() == {
        "max_tokens_per_run": 20000,
        "max_cost_usd_per_run": 2.5,
        "model_allowlist": [],
    }


def test_versions_follow_each_other_and_a_stale_version_conflicts() -> None:
    first = change_settings(Settings(), PolicySettings(max_tokens_per_run=5), 0)
    assert isinstance(first[0], PolicySettingsChanged) and first[0].version == 1
    state = Settings(1, PolicySettings(max_tokens_per_run=5))
    second = change_settings(state, PolicySettings(), None)[0]
    assert isinstance(second, PolicySettingsChanged) and second.version == 2
    with pytest.raises(Conflict, match=r"^settings_version_conflict"):
        change_settings(state, PolicySettings(), 0)


@pytest.mark.parametrize(
    ("body", "if_match", "version"),
    [({}, None, None), ({}, '"3"', 3), ({}, 'W/"3"', 3), ({"version": 2}, '"3"', 2)],
)
def test_the_version_comes_from_the_body_or_if_match(
    body: dict[str, Any], if_match: str | None, version: int | None
) -> None:
    payload = settings_payload(PolicySettingsIn.model_validate(body), if_match)
    assert payload["version"] == version
    assert payload["settings"] == {}


def test_a_malformed_if_match_is_refused() -> None:
    with pytest.raises(InvalidInput, match="If-Match"):
        settings_payload(PolicySettingsIn(), "*")


def test_admission_required_in_settings_wins_over_the_bundle() -> None:
    data = {"missioncontrol": {"config": {"tenants": {"acme": {"admission_required": "enforce"}}}}}
    assert admission_required_mode(data, "acme") == "enforce"
    assert admission_required_mode(data, "acme", {"admission_required": "warn"}) == "warn"
    assert admission_required_mode(data, "acme", {"model_allowlist": []}) == "enforce"
