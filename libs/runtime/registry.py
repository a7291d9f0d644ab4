"""The composition root's catalogue: which services make up this installation.

Services are not named anywhere under ``libs/``. Each one registers itself with a
:class:`ServiceRegistration` published as an entry point of the group
:data:`ENTRY_POINT_GROUP` in ``pyproject.toml``::

    [project.entry-points."mission_control.services"]
    gateway = "services.gateway.registration:REGISTRATION"

The supervisor (what to start, in which order), the migrator (which migration folders exist) and
``mctl`` (the demo and extra sub-commands) all read the same list from :func:`discover`. A new
service is added by writing its registration and one line of ``pyproject.toml``; nothing in
``libs/`` changes. Entry points are install metadata, so a changed ``pyproject.toml`` takes effect
after ``pip install -e .`` (``scripts/_venv.sh`` reinstalls when the file changes).
"""

from __future__ import annotations

import graphlib
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from libs.errors import MissionControlError

ENTRY_POINT_GROUP = "mission_control.services"


@dataclass(frozen=True)
class BusAccess:
    """What a service does on NATS. Its NATS user may do this and nothing else
    (:mod:`libs.runtime.busauth` turns it into the server's subject permissions)."""

    serves: str | None = None
    """The request namespace it answers: it subscribes ``mc.rpc.<serves>.>`` in the queue group
    ``<serves>`` and may publish one reply to each request it receives."""
    calls: tuple[str, ...] = ()
    """The request namespaces it sends requests to (``mc.rpc.<name>.>``). Only the gateway
    does: a request's ``tenant_id`` is trusted because nobody else can send one."""
    reads: tuple[str, ...] = ()
    """Single request subjects ``<ns>.<method>`` it sends to another service (``mc.rpc.<ns>.
    <method>``, nothing else of ``<ns>``): reads of another service's projections that a job of
    its own needs, for a tenant the gateway already authenticated."""
    consumers: tuple[str, ...] = ()
    """Durable consumers on the events stream it creates, fetches from, acks and dead-letters
    (``mc.dlq.<durable>``)."""
    removes: tuple[str, ...] = ()
    """Durable consumers of earlier builds it deletes at start."""
    work: Literal["dispatch", "take"] | None = None
    """Its part in the workflow work queues (``MC_WORK``): ``dispatch`` publishes dispatched
    steps to ``mc.work.>`` (the workflow-engine); ``take`` holds the per-agent pull consumers
    workers take their steps through (the gateway)."""
    live: Literal["publish", "watch"] | None = None
    """Its part in live telemetry (``MC_LIVE``): ``publish`` puts the usage workers stream on
    ``mc.live.>`` (the workflow-engine); ``watch`` creates the ephemeral push consumers on
    ``MC_EVENTS`` and ``MC_LIVE`` that the SSE endpoints read (the gateway)."""


class RegistrationError(MissionControlError):
    """The installed service registrations are inconsistent (the message says how)."""

    code = "registration"


@dataclass(frozen=True)
class ServiceRegistration:
    """What the runtime needs to know about one service, and nothing it must import to know it.

    References to code (``demo``, ``commands``) are ``"module:attribute"`` strings, resolved only
    when used, so discovering the services does not import their dependencies.
    """

    name: str
    """The name users see: in ``state.json``, log file names and ``mctl status``."""
    module: str
    """The module the supervisor runs as ``python -m <module>``."""
    migrations: Path | None = None
    """Folder of ``NNNN_name.sql`` files. Migration ids are ``<folder's parent name>/<file>``
    (``gateway/0001_gateway.sql``), so they do not change when a service is renamed."""
    after: tuple[str, ...] = ()
    """Services to start before this one (the supervisor starts in dependency order)."""
    demo: str | None = None
    """``"module:function"`` that ``mctl up --demo`` calls as ``function(url, data_dir)`` with this
    service's URL once the system is ready."""
    commands: Mapping[str, str] = field(default_factory=dict)
    """``mctl`` sub-command name → ``"module:typer_app"`` mounted under it."""
    scale_out_requires: tuple[str, ...] = ()
    """:class:`~libs.settings.Settings` fields that must be configured before the supervisor runs
    more than one replica of this service (``MC_REPLICAS``): a service that keeps its data in the
    process (embedded chDB) names the setting that moves it to a shared server."""
    single_replica: str | None = None
    """Why this service runs as exactly one process whatever is configured, when it does (the
    supervisor refuses more and says this)."""
    bus: BusAccess = field(default_factory=BusAccess)
    """What it does on NATS: its NATS user's permissions are made from this."""
    db_role: str | None = None
    """The PostgreSQL role this service's processes log in as (``mc_<name>``); its migrations
    make it the owner of the service's schema and grant it what it needs of the event store."""
    stream_categories: tuple[str, ...] = ()
    """The stream categories (``<tenant>/<category>/<entity>``) this service appends to. Only
    its ``db_role`` may append to them: row-level security on the event store checks every
    event against this map, which the migrator records (``eventstore.stream_categories``)."""

    @property
    def migration_component(self) -> str | None:
        """The prefix of this service's migration ids, or ``None`` without migrations."""
        return self.migrations.parent.name if self.migrations is not None else None


def resolve_ref(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (importing the module)."""
    try:
        return pkgutil.resolve_name(ref)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RegistrationError(f"cannot load {ref!r}: {exc}") from exc


def start_order(registrations: Iterable[ServiceRegistration]) -> tuple[ServiceRegistration, ...]:
    """``registrations`` in an order where every service comes after those in its ``after``.

    Services that do not depend on each other keep name order, so the order is the same on
    every machine whatever order the entry points were found in.
    """
    by_name: dict[str, ServiceRegistration] = {}
    for reg in registrations:
        if reg.name in by_name:
            raise RegistrationError(f"two services are registered as {reg.name!r}")
        by_name[reg.name] = reg
    for reg in by_name.values():
        unknown = sorted(set(reg.after) - by_name.keys())
        if unknown:
            raise RegistrationError(
                f"service {reg.name!r} starts after {', '.join(unknown)}, which is not registered"
            )
    sorter = graphlib.TopologicalSorter({name: reg.after for name, reg in by_name.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise RegistrationError(f"services depend on each other in a cycle: {cycle}") from None
    ordered: list[ServiceRegistration] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        ordered.extend(by_name[name] for name in ready)
        sorter.done(*ready)
    return tuple(ordered)


def load(entries: Iterable[Any]) -> tuple[ServiceRegistration, ...]:
    """The registrations behind ``entries`` (entry points), checked and in start order."""
    found: list[ServiceRegistration] = []
    for ep in entries:
        try:
            reg = ep.load()
        except Exception as exc:
            raise RegistrationError(f"cannot load service entry point {ep.value!r}: {exc}") from exc
        if not isinstance(reg, ServiceRegistration):
            raise RegistrationError(
                f"entry point {ep.name!r} ({ep.value}) is a {type(reg).__name__}, "
                "not a ServiceRegistration"
            )
        if reg.name != ep.name:
            raise RegistrationError(
                f"entry point {ep.name!r} registers a service named {reg.name!r}; "
                "the two must be the same"
            )
        found.append(reg)
    return start_order(found)


@lru_cache(maxsize=1)
def discover() -> tuple[ServiceRegistration, ...]:
    """Every installed service, in start order (read once per process)."""
    return load(entry_points(group=ENTRY_POINT_GROUP))


def require_services(registrations: Sequence[ServiceRegistration]) -> None:
    """Fail clearly when no service is installed (the usual cause: the project is not installed,
    or ``pyproject.toml`` changed since the last ``pip install -e .``)."""
    if not registrations:
        raise RegistrationError(
            f"no services are registered (entry point group {ENTRY_POINT_GROUP!r}); "
            "install the project with `pip install -e .`"
        )
