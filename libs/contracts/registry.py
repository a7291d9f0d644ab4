"""(event type, schema version) → model, and the upcasters that read old versions as current.

Stored events are never rewritten: an event appended at version 1 stays version 1 in the store
forever, and every read passes it through the chain ``upcast_v1_v2 → upcast_v2_v3 → …``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.errors import PermanentError, UnknownEventType

E = TypeVar("E", bound=type[DomainEvent])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_models: dict[tuple[str, int], type[DomainEvent]] = {}
_current: dict[str, int] = {}
_upcasters: dict[tuple[str, int], Upcaster] = {}


def register(model: E) -> E:
    """Class decorator: make ``model`` the reader of its (type, version)."""
    key = (model.event_type, model.schema_version)
    if key in _models and _models[key] is not model:
        raise ValueError(f"event {key} registered twice")
    _models[key] = model
    _current[model.event_type] = max(_current.get(model.event_type, 0), model.schema_version)
    return model


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: ``fn(payload_at_from_version) -> payload_at_from_version_plus_one``."""

    def deco(fn: Upcaster) -> Upcaster:
        _upcasters[(event_type, from_version)] = fn
        return fn

    return deco


def current_version(event_type: str) -> int:
    """The newest schema version of ``event_type``."""
    try:
        return _current[event_type]
    except KeyError:
        raise UnknownEventType(f"unknown event type {event_type!r}") from None


def model_for(event_type: str, version: int | None = None) -> type[DomainEvent]:
    """The model registered for (type, version); the current one when version is None."""
    v = current_version(event_type) if version is None else version
    try:
        return _models[(event_type, v)]
    except KeyError:
        raise UnknownEventType(f"unknown event type {event_type!r} v{v}") from None


def all_models() -> list[type[DomainEvent]]:
    """Every registered model, sorted by (type, version)."""
    return [_models[k] for k in sorted(_models)]


def upcast(event_type: str, version: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Carry ``payload`` from ``version`` up to the current version of ``event_type``."""
    target = current_version(event_type)
    if version > target:
        raise UnknownEventType(f"{event_type} v{version} is newer than this build (v{target})")
    data = dict(payload)
    for v in range(version, target):
        step = _upcasters.get((event_type, v))
        if step is None:
            raise UnknownEventType(f"no upcaster for {event_type} v{v} -> v{v + 1}")
        data = step(data)
    return data


def decode(envelope: EventEnvelope) -> DomainEvent:
    """The envelope's payload as the typed model of the *current* version."""
    data = upcast(envelope.event_type, envelope.schema_version, envelope.payload)
    model = model_for(envelope.event_type)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PermanentError(
            f"stored {envelope.event_type} v{envelope.schema_version} "
            f"{envelope.event_id} does not validate: {exc}"
        ) from exc
