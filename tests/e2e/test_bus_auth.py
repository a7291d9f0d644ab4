"""The bus of the whole system started by ``mctl up``: authenticated, and no process but the
gateway can ask a service anything, except the single requests a registration ``reads``
(policy-admission's simulations read recorded decisions and step costs from audit-replay)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import nats
import orjson
import pytest
from nats.errors import Error as NatsError

from libs.eventbus.jetstream import connect
from libs.runtime.busauth import credentials_dir
from tests.e2e.conftest import RunningSystem, wait_for
from tests.integration.helpers.busprobe import (
    RPC_SUBJECTS,
    Tally,
    granted_reads,
    probe_publishes,
    probe_subjects,
)

pytestmark = pytest.mark.e2e


def _users(sys_: RunningSystem) -> list[str]:
    return sorted(p.name for p in credentials_dir(sys_.data_dir).iterdir())


def test_the_bus_refuses_a_connection_without_or_with_wrong_credentials(whole_system):
    async def login(**auth: str) -> str:
        with pytest.raises(NatsError) as refused:
            await nats.connect(
                whole_system.nats_url, allow_reconnect=False, max_reconnect_attempts=0, **auth
            )
        return str(refused.value)

    assert "Authorization Violation" in asyncio.run(login())
    assert "Authorization Violation" in asyncio.run(login(user="gateway", password="guess"))


def test_every_process_has_its_own_user_and_private_password_file(whole_system):
    directory = credentials_dir(whole_system.data_dir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    services = {c["service"] for c in whole_system.state["children"] if c["kind"] == "service"}
    assert set(_users(whole_system)) == {"relay", "operator", *services}
    passwords = {whole_system.nats_credentials(u)[1].get_secret_value() for u in services}
    assert len(passwords) == len(services)
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_only_policy_admission_reads_and_only_its_simulation_requests():
    assert granted_reads() == {
        "policy-admission": {"mc.rpc.audit.simulation_decisions", "mc.rpc.audit.step_costs"}
    }


def test_no_process_but_the_gateway_gets_an_answer_about_another_tenant(whole_system):
    """Every other process's user (and the operator's) asks every service, over every request
    subject, about another tenant; the real services would answer anything that reached them."""
    victim = whole_system.new_tenant("busvictim")
    run = victim.start_run(agent_id="victim-agent").run_id
    payload = {"tenant_id": "busvictim", "run_id": str(run), "incident_id": str(run)}

    async def probe() -> Tally:
        tally = Tally()
        for user in _users(whole_system):
            if user != "gateway":
                _, password = whole_system.nats_credentials(user)
                subjects = probe_subjects(user)
                tally.add(
                    await probe_publishes(whole_system.nats_url, user, password, subjects, payload)
                )
        return tally

    async def as_gateway() -> dict[str, object]:
        nc = await connect(
            whole_system.nats_url, "e2e-control", whole_system.nats_credentials("gateway")
        )
        try:
            reply = await nc.request("mc.rpc.workflow.get_run", orjson.dumps(payload), timeout=10)
            return dict(orjson.loads(reply.data))
        finally:
            await nc.close()

    tally = asyncio.run(probe())
    print(f"\nNATS probes, running system: {tally.tried} tried, {len(tally.leaks)} leaked")
    assert tally.leaks == []
    granted = sum(len(subjects) for subjects in granted_reads().values())
    expected = len(RPC_SUBJECTS) * (len(_users(whole_system)) - 1) - granted
    assert tally.refused == tally.tried == expected
    # The control: the same question from the gateway's user is answered, so a probe that
    # reached a service would have been answered too.
    assert asyncio.run(as_gateway())["ok"] is True


def test_no_nats_password_reaches_a_log_the_state_or_a_process_environment(whole_system):
    # Traffic first, so that every process has connected and logged what it logs.
    mc = whole_system.new_tenant("buslogs")
    run = mc.start_run(agent_id="log-agent").run_id
    wait_for(lambda: mc.run(run), 20, "the run's projection")
    secrets = {
        u: whole_system.nats_credentials(u)[1].get_secret_value() for u in _users(whole_system)
    }
    data = whole_system.data_dir
    # Every log of every process and server, the state file, and the server's configuration.
    files = [
        *sorted((data / "logs").glob("*.log")),
        data / "nats" / "nats.log",
        data / "nats" / "nats.conf",
        data / "postgres.log",
        data / "state.json",
    ]
    searched = 0
    for path in files:
        text = path.read_bytes()
        searched += 1
        for user, secret in secrets.items():
            assert secret.encode() not in text, f"{user}'s NATS password is in {path}"
    assert searched == len(files) > len(secrets)
    for child in whole_system.state["children"]:
        if child["kind"] == "server" or not child.get("pid"):
            continue
        environ = Path(f"/proc/{child['pid']}/environ").read_bytes()
        assert b"NATS_PASSWORD_FILE=" in environ, child["name"]
        for secret in secrets.values():
            assert secret.encode() not in environ, child["name"]


def test_the_processes_themselves_are_never_refused_anything(whole_system):
    """The permissions cover all the system really does: every violation nats-server logged in
    this session came from a probe's connection, none from a service or the relay."""
    mc = whole_system.new_tenant("busown")
    run = mc.start_run(agent_id="own-agent").run_id
    wait_for(lambda: mc.run(run), 20, "the run's projection")
    log = (whole_system.data_dir / "nats" / "nats.log").read_text()
    refused = [line for line in log.splitlines() if "Violation" in line]
    assert [line for line in refused if ":probe-" not in line] == []
