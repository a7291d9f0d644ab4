"""The authenticated bus: a real nats-server with the users and permissions ``mctl up`` gives it.

Each test connects as the system's NATS users and tries what that user must, and must not, be
able to do. The refusals are nats-server's own (permissions violations); the probes count
every attempt and every leak (a reply, a delivered message, a stored event).
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import SecretStr
from typer.testing import CliRunner

from libs.contracts.subjects import (
    DLQ_STREAM,
    EVENTS_STREAM,
    LIVE_STREAM,
    dlq_subject,
    event_subject,
    events_filter,
)
from libs.eventbus.jetstream import ConsumerSpec, connect, ensure_consumer, ensure_streams
from libs.runtime.busauth import (
    OPERATOR_USER,
    RELAY_USER,
    Permissions,
    authorization_config,
    bus_permissions,
    credentials_dir,
    write_credentials,
)
from libs.runtime.cli import app
from libs.runtime.embedded import ServerProcess, start_nats
from libs.runtime.registry import ServiceRegistration, discover
from libs.settings import Settings
from tests.conftest import wait_until
from tests.integration.helpers.busprobe import (
    EVENT_TYPES,
    RPC_SUBJECTS,
    Eavesdropper,
    Tally,
    granted_reads,
    probe_publishes,
    probe_subjects,
)

pytestmark = pytest.mark.integration

GATEWAY = "gateway"
VICTIM = "demo"


@dataclass
class AuthBus:
    """An embedded nats-server with the users of the installed services."""

    data_dir: Path
    server: ServerProcess
    permissions: dict[str, Permissions]
    passwords: dict[str, SecretStr]
    services: tuple[ServiceRegistration, ...]

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, user: str) -> tuple[str, SecretStr]:
        return user, self.passwords[user]

    def users_except(self, *names: str) -> list[str]:
        return sorted(u for u in self.permissions if u not in names)


@pytest.fixture(scope="module")
def auth_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthBus]:
    data_dir = tmp_path_factory.mktemp("busauth")
    services = discover()
    permissions = bus_permissions(services)
    passwords = write_credentials(credentials_dir(data_dir), permissions)
    server = start_nats(data_dir, authorization=authorization_config(permissions, passwords))
    yield AuthBus(data_dir, server, permissions, passwords, services)
    server.stop()


@pytest.fixture(scope="module")
def figures() -> Iterator[Tally]:
    """Every probe of this module, summed and printed at the end (run with ``-s`` to see it)."""
    total = Tally()
    yield total
    print(f"\nNATS probes: {total.tried} tried, {total.refused} refused, {len(total.leaks)} leaks")


@pytest.fixture
async def responders(auth_bus: AuthBus) -> AsyncIterator[dict[str, list[Msg]]]:
    """Each serving service's user answering its request subjects in its queue group, as the
    service does, with the tenant it was asked about: what a leak would carry."""
    received: dict[str, list[Msg]] = {}
    conns = []
    for service in auth_bus.services:
        ns = service.bus.serves
        if ns is None:
            continue
        nc = await connect(auth_bus.url, f"responder-{ns}", auth_bus.creds(service.name))
        conns.append(nc)
        got = received.setdefault(ns, [])

        async def answer(msg: Msg, got: list[Msg] = got) -> None:
            got.append(msg)
            tenant = orjson.loads(msg.data).get("tenant_id")
            await msg.respond(orjson.dumps({"ok": True, "result": {"tenant_id": tenant}}))

        await nc.subscribe(f"mc.rpc.{ns}.>", queue=ns, cb=answer)
        await nc.flush()
    yield received
    for nc in conns:
        await nc.close()


async def _refused_login(url: str, **auth: Any) -> str:
    with pytest.raises(NatsError) as refused:
        await nats.connect(
            url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, **auth
        )
    return str(refused.value)


async def test_a_connection_without_credentials_is_refused(auth_bus: AuthBus) -> None:
    assert "Authorization Violation" in await _refused_login(auth_bus.url)


async def test_a_wrong_password_or_an_unknown_user_is_refused(auth_bus: AuthBus) -> None:
    relay_password = auth_bus.passwords[RELAY_USER].get_secret_value()
    attempts = [
        {"user": GATEWAY, "password": "not-the-password"},
        # Another user's password is as wrong as any other.
        {"user": GATEWAY, "password": relay_password},
        {"user": "intruder", "password": relay_password},
        {"user": GATEWAY, "password": ""},
    ]
    for auth in attempts:
        assert "Authorization Violation" in await _refused_login(auth_bus.url, **auth)
    # The control: the right password gets in.
    nc = await connect(auth_bus.url, "control", auth_bus.creds(GATEWAY))
    assert nc.is_connected
    await nc.close()


async def test_the_password_files_are_private_and_the_server_holds_only_hashes(
    auth_bus: AuthBus,
) -> None:
    directory = credentials_dir(auth_bus.data_dir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted(auth_bus.permissions)
    for user in files:
        assert stat.S_IMODE((directory / user).stat().st_mode) == 0o600, user
    conf = auth_bus.data_dir / "nats" / "nats.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    text = conf.read_text()
    assert "sync_interval: always" in text
    assert "no_auth_user" not in text
    for user, password in auth_bus.passwords.items():
        assert password.get_secret_value() not in text, user
    assert text.count('"password": "$2a$') == len(auth_bus.passwords)


async def test_every_user_can_do_its_own_work(auth_bus: AuthBus, responders, unique) -> None:
    """The control for the refusals below: what each process really does is allowed."""
    tenant = unique("own")
    # The relay keeps the streams current and publishes events.
    relay = await connect(auth_bus.url, RELAY_USER, auth_bus.creds(RELAY_USER))
    js = relay.jetstream()
    await ensure_streams(js)
    for event_type in EVENT_TYPES:
        await js.publish(event_subject(tenant, event_type), b"{}")
    # Each service creates, reads, fetches from and acks its own consumers, dead-letters, and
    # removes the consumers of earlier builds.
    for service in auth_bus.services:
        nc = await connect(auth_bus.url, service.name, auth_bus.creds(service.name))
        sjs = nc.jetstream()
        await ensure_streams(sjs, update=False)
        for durable in service.bus.consumers:
            await ensure_consumer(
                sjs, ConsumerSpec(durable=durable, filter_subjects=(events_filter(">", tenant),))
            )
            sub = await sjs.pull_subscribe_bind(durable, stream=EVENTS_STREAM)
            msgs = await sub.fetch(len(EVENT_TYPES), timeout=5)
            assert msgs, f"{service.name} fetched nothing from {durable}"
            for msg in msgs:
                await msg.ack_sync()
            ack = await sjs.publish(dlq_subject(durable), b"poison")
            assert ack.stream == DLQ_STREAM
            assert (await sjs.consumer_info(EVENTS_STREAM, durable)).num_ack_pending == 0
            await sub.unsubscribe()
        for durable in service.bus.removes:
            with pytest.raises(NotFoundError):
                await sjs.delete_consumer(EVENTS_STREAM, durable)
        await nc.close()
    # The gateway's requests reach every service and are answered.
    gateway = await connect(auth_bus.url, GATEWAY, auth_bus.creds(GATEWAY))
    for subject in RPC_SUBJECTS:
        reply = await gateway.request(subject, orjson.dumps({"tenant_id": tenant}), timeout=5)
        assert orjson.loads(reply.data)["result"]["tenant_id"] == tenant
    # The operator reads the consumers' state.
    operator = await connect(auth_bus.url, OPERATOR_USER, auth_bus.creds(OPERATOR_USER))
    infos = await operator.jetstream().consumers_info(EVENTS_STREAM)
    assert {i.name for i in infos} >= {d for s in auth_bus.services for d in s.bus.consumers}
    for nc in (relay, gateway, operator):
        await nc.close()


async def test_only_the_gateway_can_send_a_request_so_no_other_user_can_speak_for_a_tenant(
    auth_bus: AuthBus, responders, figures: Tally
) -> None:
    """Every user but the gateway (a worker, the relay, the operator), sending every request
    subject with another tenant's id: refused by the server, never reaching a service."""
    tally = Tally()
    for user in auth_bus.users_except(GATEWAY):
        tally.add(
            await probe_publishes(
                auth_bus.url,
                user,
                auth_bus.passwords[user],
                probe_subjects(user),  # a service's granted reads are its own work
                {"tenant_id": VICTIM, "run_id": "00000000-0000-7000-8000-000000000000"},
            )
        )
    reached = [m.subject for got in responders.values() for m in got]
    figures.add(tally)
    assert tally.leaks == [] and reached == []
    granted = sum(len(subjects) for subjects in granted_reads().values())
    expected = len(RPC_SUBJECTS) * (len(auth_bus.permissions) - 1) - granted
    assert tally.refused == tally.tried == expected
    # The control: the same request from the gateway is answered.
    gateway = await connect(auth_bus.url, GATEWAY, auth_bus.creds(GATEWAY))
    reply = await gateway.request("mc.rpc.audit.runs", orjson.dumps({"tenant_id": VICTIM}), 5)
    assert orjson.loads(reply.data)["result"] == {"tenant_id": VICTIM}
    await gateway.close()


async def test_only_the_relay_can_publish_an_event(auth_bus: AuthBus, figures: Tally) -> None:
    operator = await connect(auth_bus.url, OPERATOR_USER, auth_bus.creds(OPERATOR_USER))
    before = (await operator.jetstream().stream_info(EVENTS_STREAM)).state.messages
    tally = Tally()
    subjects = [event_subject(VICTIM, t) for t in EVENT_TYPES]
    for user in auth_bus.users_except(RELAY_USER):
        tally.add(
            await probe_publishes(
                auth_bus.url, user, auth_bus.passwords[user], subjects, {"tenant_id": VICTIM}
            )
        )
    after = (await operator.jetstream().stream_info(EVENTS_STREAM)).state.messages
    await operator.close()
    figures.add(tally)
    assert tally.leaks == []
    assert tally.refused == tally.tried == len(subjects) * (len(auth_bus.permissions) - 1)
    assert after == before


async def test_no_user_can_listen_to_another_services_requests_replies_or_events(
    auth_bus: AuthBus, responders, figures: Tally, unique
) -> None:
    """Subscriptions that would steal or copy requests (another service's subjects, in its queue
    group or not), read the gateway's replies, or read every tenant's events as they go by."""
    served = {s.name: s.bus.serves for s in auth_bus.services}
    ears = []
    for user in auth_bus.users_except(GATEWAY):
        own = served.get(user)
        subjects: list[tuple[str, str | None]] = [
            (">", None),
            ("mc.>", None),
            ("mc.rpc.>", None),
            ("mc.evt.>", None),
            (f"mc.evt.{VICTIM}.>", None),
            ("_INBOX.>", None),
            ("_INBOX.gateway.>", None),
            ("$JS.>", None),
        ]
        for ns in sorted(n for n in served.values() if n and n != own):
            subjects += [(f"mc.rpc.{ns}.>", ns), (f"mc.rpc.{ns}.>", None)]
        if own:
            # Its own requests outside its queue group: a copy of every one.
            subjects.append((f"mc.rpc.{own}.>", None))
        ears.append(await Eavesdropper.open(auth_bus.url, user, auth_bus.passwords[user], subjects))
    # Traffic on all of it: a request to every service from the gateway, an event of every type.
    gateway = await connect(auth_bus.url, GATEWAY, auth_bus.creds(GATEWAY))
    for subject in RPC_SUBJECTS:
        await gateway.request(subject, orjson.dumps({"tenant_id": VICTIM}), timeout=5)
    relay = await connect(auth_bus.url, RELAY_USER, auth_bus.creds(RELAY_USER))
    for event_type in EVENT_TYPES:
        await relay.jetstream().publish(event_subject(VICTIM, event_type), b"{}")
    await wait_until(
        lambda: sum(len(g) for g in responders.values()) == len(RPC_SUBJECTS), 10, what="answers"
    )
    tally = Tally()
    for ear in ears:
        tally.add(await ear.tally())
    await gateway.close()
    await relay.close()
    figures.add(tally)
    assert tally.leaks == []
    assert tally.refused == tally.tried


async def test_no_service_can_touch_another_services_consumers_or_the_streams(
    auth_bus: AuthBus, figures: Tally
) -> None:
    """The JetStream API beyond a service's own consumers: another's consumer (create, fetch,
    ack, delete), a new consumer over every event, reading or deleting stored messages,
    changing, purging or deleting a stream, another's dead-letter subject."""
    durables = {s.name: set(s.bus.consumers) for s in auth_bus.services}
    every = {d for ds in durables.values() for d in ds}
    api = "$JS.API"
    tally = Tally()
    for user in auth_bus.users_except(RELAY_USER):
        others = sorted(every - durables.get(user, set()))
        # The gateway watches (live event streams): it alone may create unnamed, ephemeral
        # consumers; test_the_gateway_watches_through_ephemeral_consumers_only holds it there.
        unnamed = [] if user == GATEWAY else [f"{api}.CONSUMER.CREATE.{EVENTS_STREAM}"]
        subjects = [
            *unnamed,
            f"{api}.CONSUMER.CREATE.{EVENTS_STREAM}.spy",
            f"{api}.CONSUMER.CREATE.{EVENTS_STREAM}.spy.mc.evt.{VICTIM}.>",
            f"{api}.STREAM.UPDATE.{EVENTS_STREAM}",
            f"{api}.STREAM.PURGE.{EVENTS_STREAM}",
            f"{api}.STREAM.DELETE.{EVENTS_STREAM}",
            f"{api}.STREAM.DELETE.{DLQ_STREAM}",
            f"{api}.STREAM.MSG.GET.{EVENTS_STREAM}",
            f"{api}.STREAM.MSG.DELETE.{EVENTS_STREAM}",
            f"{api}.DIRECT.GET.{EVENTS_STREAM}",
            f"{api}.STREAM.CREATE.SPY",
        ]
        for durable in others:
            subjects += [
                f"{api}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.{durable}",
                f"{api}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}",
                f"{api}.CONSUMER.DELETE.{EVENTS_STREAM}.{durable}",
                f"$JS.ACK.{EVENTS_STREAM}.{durable}.1.1.1.1.0",
                dlq_subject(durable),
            ]
        tally.add(await probe_publishes(auth_bus.url, user, auth_bus.passwords[user], subjects, {}))
    figures.add(tally)
    assert tally.leaks == []
    assert tally.refused == tally.tried


async def test_the_gateway_watches_through_ephemeral_consumers_only(auth_bus: AuthBus) -> None:
    """The SSE streams' consumers: the gateway may make an unnamed push consumer on MC_EVENTS
    and MC_LIVE delivered to its own inbox, and nothing that lasts or that it could name: no
    durable, no named consumer, no deletion. Only the workflow-engine publishes live usage."""
    nc = await connect(auth_bus.url, GATEWAY, auth_bus.creds(GATEWAY))
    try:
        js = nc.jetstream(timeout=2.0)  # a refused request is an unanswered one
        await ensure_streams(js, update=False)
        for stream in (EVENTS_STREAM, LIVE_STREAM):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            info = await js.add_consumer(
                stream,
                ConsumerConfig(deliver_subject=inbox, ack_policy=AckPolicy.NONE,
                               inactive_threshold=5.0),
            )  # fmt: skip
            assert info.name and not info.config.durable_name
            await sub.unsubscribe()
            for config in (
                ConsumerConfig(durable_name="spy", deliver_subject=inbox),
                ConsumerConfig(name="spy", deliver_subject=inbox),
            ):
                with pytest.raises((NatsError, BadRequestError)):
                    await js.add_consumer(stream, config)
            with pytest.raises((NatsError, NotFoundError)):
                await js.delete_consumer(stream, info.name)
    finally:
        await nc.close()
    tally = Tally()
    for user in auth_bus.users_except("workflow-engine", RELAY_USER):
        tally.add(await probe_publishes(
            auth_bus.url, user, auth_bus.passwords[user], [f"mc.live.{VICTIM}._.r"], {}
        ))  # fmt: skip
    assert tally.leaks == [] and tally.refused == tally.tried


async def test_mctl_nats_users_makes_users_an_external_server_admits(tmp_path: Path) -> None:
    """The external-server path: ``mctl nats-users`` writes the password files and the users
    block; a server with that block admits each process by its settings' password file, and
    running the command again keeps the passwords."""
    passwords = tmp_path / "passwords"
    conf = tmp_path / "nats-users.conf"
    args = ["nats-users", str(passwords), "--conf", str(conf)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = {p.name: p.read_text() for p in passwords.iterdir()}
    assert CliRunner().invoke(app, args).exit_code == 0
    assert {p.name: p.read_text() for p in passwords.iterdir()} == first
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    server = start_nats(tmp_path / "server", authorization=conf.read_text())
    try:
        for user in sorted(first):
            settings = Settings(NATS_USER=user, NATS_PASSWORD_FILE=passwords / user)
            nc = await connect(server.url, user, settings.nats_credentials())
            assert nc.is_connected, user
            await nc.close()
        assert "Authorization Violation" in await _refused_login(server.url)
    finally:
        server.stop()
