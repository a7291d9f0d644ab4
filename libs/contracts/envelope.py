"""The one envelope every Mission Control event travels in.

The envelope is what the event store persists and what JetStream carries. The domain payload is a
plain JSON object inside it; ``registry.decode`` turns it into the typed, current-version model.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar
from uuid import UUID

import uuid_utils
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.contracts.limits import MAX_ACTOR, MAX_CORRELATION_ID, MAX_STREAM_ID, MAX_TENANT_ID

_TENANT_RE = re.compile(rf"^[a-z0-9][a-z0-9_-]{{0,{MAX_TENANT_ID - 1}}}$")


def _check_tenant(value: str) -> str:
    # Tenants appear as one NATS subject token and in stream ids, so the alphabet is closed:
    # no dots, wildcards, slashes or upper case that could escape a subject filter.
    if not _TENANT_RE.fullmatch(value):
        raise ValueError(
            f"tenant id must be 1-{MAX_TENANT_ID} characters of a-z, 0-9, '_' or '-', starting "
            "with a letter or digit"
        )
    return value


TenantId = Annotated[str, AfterValidator(_check_tenant)]


def new_uuid7() -> UUID:
    """A time-ordered UUIDv7 as a standard-library ``UUID``."""
    return UUID(str(uuid_utils.uuid7()))


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


class DomainEvent(BaseModel):
    """Base of every typed event payload: frozen, past tense, explicitly versioned.

    Subclasses set ``event_type`` and ``schema_version`` as class variables and are registered with
    :func:`libs.contracts.registry.register`. A published (type, version) is never edited; a change
    is a new version plus an upcaster from the previous one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int]


class TraceContext(BaseModel):
    """W3C trace context carried with every event."""

    model_config = ConfigDict(frozen=True)

    traceparent: str | None = None
    tracestate: str | None = None


class EventEnvelope(BaseModel):
    """Metadata plus payload of one stored event.

    ``stream_version`` and ``position`` are assigned by the event store at append; an envelope that
    has not been appended carries ``stream_version=0`` and ``position=None``.
    """

    model_config = ConfigDict(frozen=True)

    event_id: UUID = Field(default_factory=new_uuid7)
    event_type: str
    schema_version: int = Field(ge=1)
    tenant_id: TenantId
    stream_id: str = Field(min_length=1, max_length=MAX_STREAM_ID)
    stream_version: int = Field(default=0, ge=0)
    position: int | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    recorded_at: datetime | None = None
    correlation_id: str = Field(min_length=1, max_length=MAX_CORRELATION_ID)
    causation_id: str | None = None
    actor: str = Field(min_length=1, max_length=MAX_ACTOR)
    trace_context: TraceContext = Field(default_factory=TraceContext)
    payload: dict[str, Any]

    def hashed_fields(self) -> dict[str, Any]:
        """The fields whose canonical JSON the stream hash chain covers, as JSON-ready values.

        ``recorded_at`` and ``position`` are assigned by the database, so they are not in this
        JSON; hash scheme 2 (``libs.eventbus.store.chain_hash_v2``) adds both to the link beside
        the JSON's hash.
        """
        return {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "tenant_id": self.tenant_id,
            "stream_id": self.stream_id,
            "stream_version": self.stream_version,
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat(),
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "actor": self.actor,
            "trace_context": self.trace_context.model_dump(),
            "payload": self.payload,
        }


def stream_id_for(tenant_id: str, category: str, entity_id: str) -> str:
    """The canonical stream id: ``<tenant>/<category>/<entity>``."""
    return f"{tenant_id}/{category}/{entity_id}"
