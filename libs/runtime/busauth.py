"""NATS users, their passwords and what each may do on the bus.

Every process that connects to NATS does so as a user of its own: one per registered service (its
replicas share it), one for the outbox relay, and a read-only ``operator`` for monitoring tools.
Their permissions are made from the services' registrations
(:class:`~libs.runtime.registry.BusAccess`), and nats-server enforces them:

* **Requests** ``mc.rpc.<ns>.<method>``: only a user whose registration ``calls`` ``<ns>`` may
  publish one (the gateway). The service that ``serves`` ``<ns>`` may subscribe to its subjects,
  in its queue group only, and may publish one reply to each request it received
  (``allow_responses``). A service therefore trusts the ``tenant_id`` a request names: only the
  gateway, which authenticated the caller, can have sent it. A service may also send the few
  single requests its registration ``reads`` (policy-admission's simulations read recorded
  decisions and step costs from audit-replay), for a tenant the gateway authenticated.
* **Events** ``mc.evt.>``: only the relay publishes them. The services append to the event store;
  the relay publishes what is committed.
* **Dead letters** ``mc.dlq.<durable>``: each service, for its own durable consumers.
* **The JetStream API**: every process may create the two streams with the configuration in code
  and read their information; only the relay may update them. Each service may create, read,
  fetch from and acknowledge its own durable consumers and nothing else; none may delete or purge
  a stream or read another's consumer.
* **Work queues** ``mc.work.<tenant>.<agent>`` (stream ``MC_WORK``): only the workflow-engine
  publishes dispatched steps; only the gateway creates, fetches from and acknowledges the
  per-agent consumers (``work-<tenant>-<agent>``) that workers take their steps through over
  HTTP, so an agent never needs bus credentials.
* **Live telemetry** ``mc.live.<tenant>.<execution>.<run>`` (stream ``MC_LIVE``): only the
  workflow-engine publishes the usage workers stream. Only the gateway watches: it may create
  *ephemeral* consumers (``$JS.API.CONSUMER.CREATE.<stream>`` without a name, which the server
  refuses for a durable) on ``MC_EVENTS`` and ``MC_LIVE``, pushed to its own inbox, and answer
  their flow control; it can neither name, read nor delete anybody's durable consumer.
* **Replies** reach a process on its own inbox prefix ``_INBOX.<user>.``, which no other user may
  subscribe to.

Anything else is refused, and so is a connection without a user and password (the configuration
has no ``no_auth_user``). The server holds bcrypt hashes; each password is kept in a file of its
own, mode 0600, which the process it belongs to is pointed at (``NATS_PASSWORD_FILE``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from pydantic import SecretStr

from libs.contracts.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    LIVE_PREFIX,
    LIVE_STREAM,
    RPC_PREFIX,
    WORK_PREFIX,
    WORK_STREAM,
    inbox_prefix,
)
from libs.errors import InvalidInput
from libs.runtime.registry import BusAccess, ServiceRegistration
from libs.runtime.state import write_private
from libs.settings import read_password_file

RELAY_USER = "relay"
OPERATOR_USER = "operator"
"""Read-only monitoring: stream and consumer information, never a message."""
RESERVED_USERS = frozenset({RELAY_USER, OPERATOR_USER})
CREDENTIALS_DIR = "credentials"

JS_API = "$JS.API"
STREAMS = (EVENTS_STREAM, DLQ_STREAM, WORK_STREAM, LIVE_STREAM)
# nats-server checks the password of every new connection against its hash, in the connection's
# read loop. The cost of bcrypt protects guessable passwords; these are 256 random bits, which no
# cost makes easier or harder to find from the hash. 2**6 rounds take ~5 ms a check; 2**10 took
# ~90 ms, and seconds on a loaded machine where a dozen processes connect at once.
BCRYPT_ROUNDS = 6
PASSWORD_BYTES = 32


@dataclass(frozen=True)
class Permissions:
    """Subjects a NATS user may publish to and subscribe to (``"subject queue"`` restricts a
    subscription to a queue group), and whether it may answer the requests it receives."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def to_config(self) -> dict[str, object]:
        """The ``permissions`` map of a user in nats-server's configuration."""
        config: dict[str, object] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            config["allow_responses"] = True
        return config


def _streams(*actions: str) -> list[str]:
    return [f"{JS_API}.STREAM.{action}.{stream}" for action in actions for stream in STREAMS]


def _consumer(durable: str) -> list[str]:
    """What a service does with one of its durable consumers on the events stream."""
    return [
        f"{JS_API}.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}",
        f"{JS_API}.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.{durable}",
        f"{JS_API}.CONSUMER.INFO.{EVENTS_STREAM}.{durable}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}",
        f"$JS.ACK.{EVENTS_STREAM}.{durable}.>",
        f"{DLQ_PREFIX}.{durable}",
    ]


def service_permissions(user: str, bus: BusAccess) -> Permissions:
    """The permissions of a service's user, from what its registration says it does."""
    publish = _streams("CREATE", "INFO")
    subscribe = [f"{inbox_prefix(user)}.>"]
    publish += [f"{RPC_PREFIX}.{ns}.>" for ns in bus.calls]
    publish += [f"{RPC_PREFIX}.{method}" for method in bus.reads]
    for durable in bus.consumers:
        publish += _consumer(durable)
    publish += [f"{JS_API}.CONSUMER.DELETE.{EVENTS_STREAM}.{d}" for d in bus.removes]
    if bus.work == "dispatch":
        publish.append(f"{WORK_PREFIX}.>")
    elif bus.work == "take":
        # The consumers are made per tenant and agent on first use: names not known in advance.
        publish += [
            f"{JS_API}.CONSUMER.CREATE.{WORK_STREAM}.>",
            f"{JS_API}.CONSUMER.DURABLE.CREATE.{WORK_STREAM}.>",
            f"{JS_API}.CONSUMER.INFO.{WORK_STREAM}.>",
            f"{JS_API}.CONSUMER.MSG.NEXT.{WORK_STREAM}.>",
            f"$JS.ACK.{WORK_STREAM}.>",
        ]
    if bus.live == "publish":
        publish.append(f"{LIVE_PREFIX}.>")
    elif bus.live == "watch":
        for stream in (EVENTS_STREAM, LIVE_STREAM):
            publish += [f"{JS_API}.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>"]
    if bus.serves:
        # Only in the queue group: a plain subscription would get a copy of every request.
        subscribe.append(f"{RPC_PREFIX}.{bus.serves}.> {bus.serves}")
    return Permissions(tuple(publish), tuple(subscribe), allow_responses=bool(bus.serves))


def relay_permissions() -> Permissions:
    """The relay publishes every event, and keeps the streams' configuration current."""
    return Permissions(
        (f"{EVENTS_PREFIX}.>", *_streams("CREATE", "UPDATE", "INFO")),
        (f"{inbox_prefix(RELAY_USER)}.>",),
    )


def operator_permissions() -> Permissions:
    """Monitoring: the account's, the streams' and the consumers' information only."""
    return Permissions(
        (
            f"{JS_API}.INFO",
            f"{JS_API}.STREAM.NAMES",
            f"{JS_API}.STREAM.LIST",
            *_streams("INFO"),
            *(f"{JS_API}.CONSUMER.{a}.{s}" for a in ("NAMES", "LIST") for s in STREAMS),
            *(f"{JS_API}.CONSUMER.INFO.{s}.*" for s in STREAMS),
        ),
        (f"{inbox_prefix(OPERATOR_USER)}.>",),
    )


def bus_permissions(services: Sequence[ServiceRegistration]) -> dict[str, Permissions]:
    """Every NATS user of a system made of ``services``, with its permissions."""
    users: dict[str, Permissions] = {
        RELAY_USER: relay_permissions(),
        OPERATOR_USER: operator_permissions(),
    }
    served: dict[str, str] = {}
    for service in services:
        if service.name in RESERVED_USERS:
            raise InvalidInput(f"a service may not be named {service.name!r}: it is a NATS user")
        serves = service.bus.serves
        if serves is not None:
            if serves in served:
                raise InvalidInput(
                    f"{service.name} and {served[serves]} both serve the requests {serves!r}"
                )
            served[serves] = service.name
        users[service.name] = service_permissions(service.name, service.bus)
    return users


def credentials_dir(data_dir: Path) -> Path:
    """Where ``mctl up`` keeps the NATS users' password files of the embedded server."""
    return data_dir / "nats" / CREDENTIALS_DIR


# --- passwords ------------------------------------------------------------------------------------


def new_password() -> SecretStr:
    """A random password (256 bits, URL-safe text)."""
    return SecretStr(secrets.token_urlsafe(PASSWORD_BYTES))


def hash_password(password: SecretStr) -> str:
    """The bcrypt hash nats-server checks ``password`` against."""
    salt = bcrypt.gensalt(rounds=BCRYPT_ROUNDS, prefix=b"2a")
    return bcrypt.hashpw(password.get_secret_value().encode(), salt).decode()


def write_credentials(
    directory: Path, users: Iterable[str], *, keep: bool = False
) -> dict[str, SecretStr]:
    """The password of each of ``users``, each in its file ``directory/<user>`` (mode 0600, in a
    directory of mode 0700).

    ``mctl up`` makes new ones at every start (``keep=False``); ``mctl nats-users`` keeps those
    already there and makes only the missing ones (``keep=True``), so it can be run again.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords: dict[str, SecretStr] = {}
    for user in users:
        path = directory / user
        if keep and path.exists():
            passwords[user] = read_password_file(path, f"the password of {user}")
            continue
        passwords[user] = new_password()
        write_private(path, passwords[user].get_secret_value())
    return passwords


def authorization_config(
    permissions: Mapping[str, Permissions], passwords: Mapping[str, SecretStr]
) -> str:
    """nats-server's ``authorization`` block: every user with a bcrypt hash of its password and
    its permissions. No ``no_auth_user``, so a connection without credentials is refused."""
    missing = sorted(permissions.keys() - passwords.keys())
    if missing:
        raise InvalidInput(f"no password for the NATS users {', '.join(missing)}")
    users = [
        {
            "user": user,
            # Quoted (JSON) strings: unquoted, the '$' of a bcrypt hash starts a variable.
            "password": hash_password(passwords[user]),
            "permissions": perms.to_config(),
        }
        for user, perms in sorted(permissions.items())
    ]
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"
