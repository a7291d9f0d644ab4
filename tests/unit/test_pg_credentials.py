"""PostgreSQL credentials and the map of stream categories to the roles that own them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from libs.errors import InvalidInput
from libs.eventbus.migrate import RELAY_ROLE, login_roles, stream_category_owners
from libs.runtime.pg_credentials import (
    ensure_passwords,
    load_passwords,
    parse_role_passwords,
    scram_verifier,
    with_credentials,
)
from libs.runtime.registry import RegistrationError, ServiceRegistration, discover


def test_passwords_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    first = ensure_passwords(tmp_path, ["postgres", "mc_gateway"])
    path = tmp_path / "postgres-credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    again = ensure_passwords(tmp_path, ["mc_gateway", "mc_cost"])
    assert again["mc_gateway"].get_secret_value() == first["mc_gateway"].get_secret_value()
    assert set(load_passwords(tmp_path)) == {"postgres", "mc_gateway", "mc_cost"}
    assert len({p.get_secret_value() for p in again.values()}) == 3
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_damaged_credentials_file_is_named_without_its_content(tmp_path: Path) -> None:
    (tmp_path / "postgres-credentials.json").write_text('["hunter2"]')
    with pytest.raises(InvalidInput, match=r"postgres-credentials\.json") as info:
        load_passwords(tmp_path)
    assert "hunter2" not in str(info.value)


def test_role_passwords_from_the_environment_are_checked_without_echoing_them() -> None:
    got = parse_role_passwords(SecretStr('{"mc_gateway": "s3cret"}'))
    assert got["mc_gateway"].get_secret_value() == "s3cret"
    for bad in ('{"mc_gateway": ""}', "s3cret", '["s3cret"]'):
        with pytest.raises(InvalidInput) as info:
            parse_role_passwords(SecretStr(bad))
        assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://127.0.0.1:5432/mc", "postgresql://mc_cost:pw@127.0.0.1:5432/mc"),
        (
            "postgresql://old:oldpw@db/mc?sslmode=require",
            "postgresql://mc_cost:pw@db/mc?sslmode=require",
        ),
        ("postgresql://old@db", "postgresql://mc_cost:pw@db"),
    ],
)
def test_a_url_is_given_a_role_and_its_password(url: str, expected: str) -> None:
    assert with_credentials(url, "mc_cost", SecretStr("pw")) == expected


def test_a_password_needing_quotes_is_quoted_in_the_url() -> None:
    url = with_credentials("postgresql://db/mc", "mc_cost", SecretStr("a@b/c:d"))
    assert url == "postgresql://mc_cost:a%40b%2Fc%3Ad@db/mc"


def test_the_scram_verifier_proves_the_password() -> None:
    """Recompute the stored key from the verifier's salt, as the server does at login."""
    verifier = scram_verifier(SecretStr("correct horse"))
    method, rest = verifier.split("$", 1)
    params, keys = rest.split("$")
    iterations, salt = params.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    assert method == "SCRAM-SHA-256" and int(iterations) == 4096
    for password, ok in (("correct horse", True), ("wrong horse", False)):
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(salt), int(iterations)
        )
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        assert (hashlib.sha256(client_key).digest() == stored_key) is ok
        assert (hmac.new(salted, b"Server Key", hashlib.sha256).digest() == server_key) is ok
    assert "correct horse" not in verifier


def test_every_service_and_the_relay_log_in_as_a_role_of_their_own() -> None:
    roles = login_roles()
    assert roles["relay"] == RELAY_ROLE
    assert {s.name for s in discover()} <= roles.keys()
    assert len(set(roles.values())) == len(roles)
    assert "mc_service" not in roles.values()


def test_each_stream_category_has_exactly_the_owner_its_aggregates_say() -> None:
    """The registrations are the one map of categories to owners; it must match the code that
    appends (each service's aggregates and stream helpers)."""
    from libs.domain.prices import PRICES
    from libs.domain.run import RUN_CATEGORY
    from libs.eventbus.anchor import CHECKPOINT_STREAM
    from services.audit_replay.evidence_queries import ATTESTATION_CATEGORY
    from services.cost.handlers import cost_stream
    from services.gateway.keys import API_KEY_CATEGORY, TENANT_CATEGORY
    from services.gateway.users import USER_CATEGORY
    from services.incident.handlers import INCIDENT
    from services.policy_admission.handlers import BUNDLE, RUN_CONTEXT
    from services.workflow_engine.approvals import APPROVAL_POLICY_CATEGORY
    from services.workflow_engine.budgets import BUDGET_CATEGORY
    from services.workflow_engine.definitions import AGENT_CATEGORY, WORKFLOW_CATEGORY
    from services.workflow_engine.executions import EXECUTION_CATEGORY
    from services.workflow_engine.handlers import RUN
    from services.workflow_engine.promotions import PROMOTION_CATEGORY

    used = {
        RUN.category: "mc_workflow_engine",
        RUN_CATEGORY: "mc_workflow_engine",
        RUN_CONTEXT.category: "mc_policy_admission",
        BUNDLE.category: "mc_policy_admission",
        INCIDENT.category: "mc_incident",
        PRICES.category: "mc_cost",
        cost_stream("t", "r").split("/")[1]: "mc_cost",
        TENANT_CATEGORY: "mc_gateway",
        API_KEY_CATEGORY: "mc_gateway",
        USER_CATEGORY: "mc_gateway",
        WORKFLOW_CATEGORY: "mc_workflow_engine",
        AGENT_CATEGORY: "mc_workflow_engine",
        EXECUTION_CATEGORY: "mc_workflow_engine",
        APPROVAL_POLICY_CATEGORY: "mc_workflow_engine",
        BUDGET_CATEGORY: "mc_workflow_engine",
        PROMOTION_CATEGORY: "mc_workflow_engine",
        CHECKPOINT_STREAM.split("/")[1]: "mc_relay",
        ATTESTATION_CATEGORY: "mc_audit_replay",
    }
    assert stream_category_owners() == used


def test_two_services_owning_one_category_are_refused() -> None:
    a = ServiceRegistration(name="a", module="a", db_role="mc_a", stream_categories=("run",))
    b = ServiceRegistration(name="b", module="b", db_role="mc_b", stream_categories=("run",))
    with pytest.raises(RegistrationError, match="both own the stream category 'run'"):
        stream_category_owners([a, b])
    c = ServiceRegistration(name="c", module="c", stream_categories=("x",))
    with pytest.raises(RegistrationError, match="no db_role"):
        stream_category_owners([c])


def test_the_credentials_file_is_json_of_role_to_password(tmp_path: Path) -> None:
    ensure_passwords(tmp_path, ["mc_relay"])
    data = json.loads((tmp_path / "postgres-credentials.json").read_text())
    assert list(data) == ["mc_relay"] and isinstance(data["mc_relay"], str)
