"""Probing the bus as one NATS user: what nats-server refuses, and whether anything gets through.

A probe is one thing a user must not be able to do: send a request, publish an event, call a
JetStream API it has no business with, subscribe to another's subjects. nats-server refuses it
with a permissions violation, which the client hears through its error callback, and never
delivers it. A probe counts as refused only when the server named its subject in a violation, so
a probe that went through can never be counted as refused; whatever comes back besides (a reply,
a delivered message) is a leak.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import SecretStr

from libs.contracts.subjects import inbox_prefix
from libs.runtime.busauth import RPC_PREFIX
from libs.runtime.registry import discover
from tests.conftest import wait_until

ASYNCAPI = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.json"


def _addresses() -> list[str]:
    # The checked-in AsyncAPI document names every subject on the bus, and a unit test keeps it
    # equal to the code's routes and events.
    doc = json.loads(ASYNCAPI.read_text())
    return [str(channel["address"]) for channel in doc["channels"].values()]


RPC_SUBJECTS: tuple[str, ...] = tuple(a for a in _addresses() if a.startswith("mc.rpc."))
EVENT_TYPES: tuple[str, ...] = tuple(
    a.removeprefix("mc.evt.{tenant_id}.") for a in _addresses() if a.startswith("mc.evt.")
)


def granted_reads() -> dict[str, set[str]]:
    """The request subjects each service's registration lets it send (``BusAccess.reads``): its
    own work, which probes of what a user may not ask leave out."""
    return {r.name: {f"{RPC_PREFIX}.{m}" for m in r.bus.reads} for r in discover() if r.bus.reads}


def probe_subjects(user: str) -> list[str]:
    """Every request subject but those ``user``'s registration reads."""
    granted = granted_reads().get(user, set())
    return [s for s in RPC_SUBJECTS if s not in granted]


@dataclass
class Tally:
    """Probes tried, refused by the server, and what leaked (one line each)."""

    tried: int = 0
    refused: int = 0
    leaks: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.tried += other.tried
        self.refused += other.refused
        self.leaks += other.leaks


class UserConnection:
    """A connection as one NATS user that records the permission violations it is told of."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.nc = NATS()
        self.violations: list[str] = []

    @classmethod
    async def open(cls, url: str, user: str, password: SecretStr) -> UserConnection:
        conn = cls(user)

        async def on_error(exc: Exception) -> None:
            text = str(exc)
            if "permissions violation" in text:
                conn.violations.append(text)

        conn.nc = await nats.connect(
            url,
            user=user,
            password=password.get_secret_value(),
            inbox_prefix=inbox_prefix(user),
            name=f"probe-{user}",
            error_cb=on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        return conn

    def refused(self, subject: str, kind: str = "publish") -> bool:
        """Whether the server refused a ``kind`` ("publish" / "subscription") on ``subject``."""
        # nats.py lowercases the server's error text, subject and all.
        return any(f'for {kind} to "{subject.lower()}"' in v for v in self.violations)

    async def wait_refusals(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the server has reported ``count`` violations; fail at the deadline.

        The server answers a connection's operations in order, so after a flush every
        violation is on its way; the callbacks that record them run soon after.
        """
        await self.nc.flush(timeout=timeout)
        await wait_until(
            lambda: len(self.violations) >= count,
            timeout,
            interval=0.01,
            what=f"{count} refusals for {self.user} (got {len(self.violations)})",
        )

    async def close(self) -> None:
        await self.nc.close()


async def probe_publishes(
    url: str, user: str, password: SecretStr, subjects: Iterable[str], payload: dict[str, Any]
) -> Tally:
    """Publish ``payload`` as ``user`` to each subject, asking for a reply; each one must be
    refused and nothing must answer."""
    subjects = list(subjects)
    conn = await UserConnection.open(url, user, password)
    replies: list[Msg] = []
    try:
        inbox = f"{inbox_prefix(user)}.probe"

        async def on_reply(msg: Msg) -> None:
            replies.append(msg)

        await conn.nc.subscribe(inbox, cb=on_reply)
        for subject in subjects:
            await conn.nc.publish(subject, orjson.dumps(payload), reply=inbox)
        # A probe that went through is never refused: the tally below names it.
        with contextlib.suppress(AssertionError):
            await conn.wait_refusals(len(subjects))
        tally = Tally(tried=len(subjects))
        for subject in subjects:
            if conn.refused(subject):
                tally.refused += 1
            else:
                tally.leaks.append(f"{user} published to {subject} unrefused")
        tally.leaks += [f"{user} got a reply: {m.data[:200]!r}" for m in replies]
        return tally
    finally:
        await conn.close()


@dataclass
class Eavesdropper:
    """Subscriptions one user tried to make on subjects that are not its own."""

    conn: UserConnection
    subjects: list[tuple[str, str | None]]
    received: list[Msg] = field(default_factory=list)

    @classmethod
    async def open(
        cls, url: str, user: str, password: SecretStr, subjects: Iterable[tuple[str, str | None]]
    ) -> Eavesdropper:
        """Subscribe as ``user`` to each ``(subject, queue group or None)``."""
        ear = cls(await UserConnection.open(url, user, password), list(subjects))

        async def on_msg(msg: Msg) -> None:
            ear.received.append(msg)

        for subject, queue in ear.subjects:
            await ear.conn.nc.subscribe(subject, queue=queue or "", cb=on_msg)
        with contextlib.suppress(AssertionError):
            await ear.conn.wait_refusals(len(ear.subjects))
        return ear

    async def tally(self) -> Tally:
        """After traffic on those subjects: each subscription refused, nothing delivered."""
        await self.conn.nc.flush()
        user = self.conn.user
        tally = Tally(tried=len(self.subjects))
        for subject, _ in self.subjects:
            if self.conn.refused(subject, "subscription"):
                tally.refused += 1
            else:
                tally.leaks.append(f"{user} subscribed to {subject} unrefused")
        tally.leaks += [f"{user} received {m.subject}" for m in self.received]
        await self.conn.close()
        return tally
