"""The NATS users' permissions, passwords and settings, without a server (the server's
enforcement is tests/integration/test_bus_auth.py)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import bcrypt
import pytest

from libs.errors import InvalidInput
from libs.runtime import supervisor as sup
from libs.runtime.busauth import (
    OPERATOR_USER,
    RELAY_USER,
    authorization_config,
    bus_permissions,
    credentials_dir,
    new_password,
    write_credentials,
)
from libs.runtime.registry import BusAccess, ServiceRegistration, discover
from libs.settings import Settings
from services.audit_replay.lanes import LANES, LEGACY_DURABLE
from services.cost.handlers import CONSUMER as COST_CONSUMER
from services.incident.entrypoints import BUDGETS_DURABLE as INCIDENT_BUDGETS_DURABLE
from services.incident.entrypoints import RPC_SERVICE as INCIDENT_RPC
from services.incident.entrypoints import VIOLATIONS_DURABLE as INCIDENT_DURABLE
from services.policy_admission.entrypoints import INCIDENTS_DURABLE as ADMISSION_INCIDENTS_DURABLE
from services.policy_admission.entrypoints import RPC_SERVICE as ADMISSION_RPC
from services.policy_admission.entrypoints import STEPS_DURABLE as ADMISSION_STEPS_DURABLE
from services.policy_admission.simulation_jobs import SIMULATION_DECISIONS, STEP_COSTS
from services.workflow_engine.entrypoints import (
    COSTS_DURABLE,
    DISPATCH_DURABLE,
    EXECUTIONS_DURABLE,
)
from services.workflow_engine.entrypoints import RPC_SERVICE as WORKFLOW_RPC
from services.workflow_engine.entrypoints import VIOLATIONS_DURABLE as WORKFLOW_DURABLE

pytestmark = pytest.mark.unit


def _by_name() -> dict[str, ServiceRegistration]:
    return {s.name: s for s in discover()}


def test_the_registrations_name_the_consumers_and_request_subjects_the_code_uses() -> None:
    """A consumer or route the registration leaves out would be refused by the server."""
    regs = _by_name()
    assert regs["workflow-engine"].bus == BusAccess(
        serves=WORKFLOW_RPC,
        consumers=(WORKFLOW_DURABLE, EXECUTIONS_DURABLE, DISPATCH_DURABLE, COSTS_DURABLE),
        work="dispatch",
        live="publish",
    )
    assert regs["gateway"].bus.work == "take"
    assert regs["gateway"].bus.live == "watch"
    assert regs["incident"].bus == BusAccess(
        serves=INCIDENT_RPC, consumers=(INCIDENT_DURABLE, INCIDENT_BUDGETS_DURABLE)
    )
    assert regs["cost"].bus == BusAccess(serves="cost", consumers=(COST_CONSUMER,))
    assert regs["policy-admission"].bus == BusAccess(
        serves=ADMISSION_RPC,
        consumers=(ADMISSION_STEPS_DURABLE, ADMISSION_INCIDENTS_DURABLE),
        reads=(f"audit.{SIMULATION_DECISIONS}", f"audit.{STEP_COSTS}"),
    )
    assert regs["audit-replay"].bus == BusAccess(
        serves="audit",
        consumers=tuple(lane.durable for lane in LANES),
        removes=(LEGACY_DURABLE,),
    )


def test_only_the_gateway_sends_requests_but_the_single_reads_a_registration_names() -> None:
    regs = _by_name()
    served = {r.bus.serves for r in regs.values() if r.bus.serves}
    assert set(regs["gateway"].bus.calls) == served
    assert regs["gateway"].bus.serves is None
    assert [r.name for r in regs.values() if r.bus.calls] == ["gateway"]
    perms = bus_permissions(tuple(regs.values()))
    senders = [u for u, p in perms.items() if any(s.startswith("mc.rpc.") for s in p.publish)]
    assert sorted(senders) == ["gateway", "policy-admission"]
    # policy-admission sends exactly the two reads its simulations need, nothing else of audit.
    reads = [s for s in perms["policy-admission"].publish if s.startswith("mc.rpc.")]
    assert reads == ["mc.rpc.audit.simulation_decisions", "mc.rpc.audit.step_costs"]


def test_only_the_engine_dispatches_work_and_only_the_gateway_takes_it() -> None:
    perms = bus_permissions(discover())
    for user, p in perms.items():
        dispatches = [s for s in p.publish if s.startswith("mc.work")]
        assert dispatches == (["mc.work.>"] if user == "workflow-engine" else []), user
        takes = [s for s in p.publish if "MSG.NEXT.MC_WORK" in s]
        assert bool(takes) == (user == "gateway"), user


def test_only_the_engine_publishes_live_usage_and_only_the_gateway_watches() -> None:
    """The gateway may create only unnamed (ephemeral) consumers to watch with: never a
    durable, and it may delete none."""
    perms = bus_permissions(discover())
    for user, p in perms.items():
        live = [s for s in p.publish if s.startswith("mc.live")]
        assert live == (["mc.live.>"] if user == "workflow-engine" else []), user
        watch = [s for s in p.publish if s.startswith("$JS.API.CONSUMER.CREATE.MC_LIVE")]
        assert watch == (["$JS.API.CONSUMER.CREATE.MC_LIVE"] if user == "gateway" else []), user
    gateway = perms["gateway"].publish
    assert "$JS.API.CONSUMER.CREATE.MC_EVENTS" in gateway
    assert not [s for s in gateway if s.startswith("$JS.API.CONSUMER.CREATE.MC_EVENTS.")]
    assert not [s for s in gateway if "CONSUMER.DELETE" in s or "DURABLE.CREATE.MC_EVENTS" in s]
    assert {"$JS.FC.MC_EVENTS.>", "$JS.FC.MC_LIVE.>"} <= set(gateway)


def test_only_the_relay_publishes_events_and_nobody_deletes_or_updates_a_stream() -> None:
    perms = bus_permissions(discover())
    assert set(perms) == {RELAY_USER, OPERATOR_USER, *(r.name for r in discover())}
    for user, p in perms.items():
        events = [s for s in p.publish if s.startswith("mc.evt")]
        assert events == (["mc.evt.>"] if user == RELAY_USER else []), user
        assert not any(".DELETE." in s and "STREAM" in s for s in p.publish), user
        assert not any(".PURGE." in s for s in p.publish), user
        assert any(".STREAM.UPDATE." in s for s in p.publish) == (user == RELAY_USER), user
        # Nothing but its own inbox and, for a service, its own requests in its queue group.
        assert p.subscribe[0] == f"_INBOX.{user}.>", user
        assert not any(s == ">" or s.startswith(("mc.evt", "_INBOX.>")) for s in p.subscribe)


def test_a_service_subscribes_to_its_own_requests_only_in_its_queue_group() -> None:
    perms = bus_permissions(discover())
    for reg in discover():
        if reg.bus.serves:
            ns = reg.bus.serves
            assert perms[reg.name].subscribe[1:] == (f"mc.rpc.{ns}.> {ns}",)
            assert perms[reg.name].allow_responses


def test_a_service_named_like_a_reserved_user_or_two_serving_one_namespace_are_refused() -> None:
    relay = ServiceRegistration(name=RELAY_USER, module="pkg.relay")
    with pytest.raises(InvalidInput, match="may not be named 'relay'"):
        bus_permissions((relay,))
    a = ServiceRegistration(name="a", module="pkg.a", bus=BusAccess(serves="x"))
    b = ServiceRegistration(name="b", module="pkg.b", bus=BusAccess(serves="x"))
    with pytest.raises(InvalidInput, match="b and a both serve the requests 'x'"):
        bus_permissions((a, b))


def test_the_server_configuration_holds_hashes_that_match_and_never_a_password(
    tmp_path: Path,
) -> None:
    perms = bus_permissions(discover())
    passwords = write_credentials(tmp_path / "creds", perms)
    text = authorization_config(perms, passwords)
    block = json.loads(re.search(r"users = (\[.*\])", text, re.S).group(1))  # type: ignore[union-attr]
    assert {u["user"] for u in block} == set(perms)
    for user in block:
        password = passwords[user["user"]].get_secret_value()
        assert password not in text
        assert bcrypt.checkpw(password.encode(), user["password"].encode())
    assert "no_auth_user" not in text
    with pytest.raises(InvalidInput, match="no password for the NATS users gateway"):
        authorization_config(perms, {u: p for u, p in passwords.items() if u != "gateway"})


def test_password_files_are_created_private_and_replaced_at_every_start(tmp_path: Path) -> None:
    directory = credentials_dir(tmp_path)
    first = write_credentials(directory, ["gateway", "relay"])
    second = write_credentials(directory, ["gateway", "relay"])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for user in ("gateway", "relay"):
        path = directory / user
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == second[user].get_secret_value()
        assert first[user].get_secret_value() != second[user].get_secret_value()
    assert sorted(p.name for p in directory.iterdir()) == ["gateway", "relay"]


def test_settings_take_the_password_from_its_file_first_and_never_show_it(
    tmp_path: Path,
) -> None:
    secret = new_password().get_secret_value()
    path = tmp_path / "gateway"
    path.write_text(secret + "\n")
    settings = Settings(NATS_USER="gateway", NATS_PASSWORD="other", NATS_PASSWORD_FILE=path)
    found = settings.nats_credentials()
    assert found is not None
    assert found[0] == "gateway"
    assert found[1].get_secret_value() == secret
    assert secret not in repr(settings) and "other" not in repr(settings)
    assert Settings(NATS_USER="u", NATS_PASSWORD="p").nats_credentials() is not None
    assert Settings().nats_credentials() is None


@pytest.mark.parametrize(
    "given",
    [{"NATS_USER": "gateway"}, {"NATS_PASSWORD": "only-a-password"}],
)
def test_a_user_without_a_password_or_the_reverse_is_refused(given: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="set together or not at all") as refused:
        Settings(**given).nats_credentials()  # type: ignore[arg-type]
    assert "only-a-password" not in str(refused.value)


def test_an_unreadable_or_empty_password_file_is_named_not_quoted(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(InvalidInput, match=r"NATS_PASSWORD_FILE: .*empty is empty"):
        Settings(NATS_USER="u", NATS_PASSWORD_FILE=empty).nats_credentials()
    with pytest.raises(InvalidInput, match=r"NATS_PASSWORD_FILE: cannot read .*missing"):
        Settings(NATS_USER="u", NATS_PASSWORD_FILE=tmp_path / "missing").nats_credentials()


def test_each_process_is_pointed_at_its_own_password_file_never_given_the_password(
    tmp_path: Path,
) -> None:
    s = sup.Supervisor(tmp_path, Settings(), discover())
    s.nats_url = "nats://127.0.0.1:1"
    s.database_url = "postgresql://mc_service@127.0.0.1:2/missioncontrol"
    s._log_file = None
    s.log_dir.mkdir(parents=True)
    users = s._new_nats_users()
    assert "authorization" in users
    for child in s.plan_processes():
        user = child.service or RELAY_USER
        assert child.env["NATS_USER"] == user
        assert child.env["NATS_PASSWORD_FILE"] == str(credentials_dir(s.data_dir) / user)
        assert "NATS_PASSWORD" not in child.env


def test_with_an_external_server_the_credentials_directory_must_hold_every_user(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "creds"
    write_credentials(directory, ["relay", "gateway"])
    settings = Settings(NATS_URL="nats://nats.example:4222", MC_NATS_CREDENTIALS_DIR=directory)
    s = sup.Supervisor(tmp_path, settings, discover())
    with pytest.raises(sup.SupervisorError, match="no password file for audit-replay, cost"):
        s._external_nats_users()
    write_credentials(directory, bus_permissions(discover()))
    s._external_nats_users()
    assert s._nats_env("cost") == {
        "NATS_USER": "cost",
        "NATS_PASSWORD_FILE": str(directory.resolve() / "cost"),
    }
    # Without a directory the processes inherit NATS_USER / NATS_PASSWORD from the environment.
    assert sup.Supervisor(tmp_path, Settings(), discover())._nats_env("cost") == {}
