"""The incident service's request routes (``mc.rpc.incident.<method>``) and its consumer spec."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.envelope import TenantId
from libs.contracts.limits import MAX_BY
from libs.contracts.subjects import events_filter
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import Meta, RpcServer
from services.incident.domain import MAX_RESOLUTION
from services.incident.handlers import IncidentHandlers

RPC_SERVICE = "incident"
VIOLATIONS_DURABLE = "incident-violations"
BUDGETS_DURABLE = "incident-budgets"
APPLIED_TABLE = "incident.applied_events"


def violation_consumer_spec(
    durable: str = VIOLATIONS_DURABLE, tenant_id: str = "*"
) -> ConsumerSpec:
    """The durable consumer of ``policy.violation_detected`` (tests narrow durable and tenant)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("policy.violation_detected", tenant_id),),
    )


def budget_consumer_spec(durable: str = BUDGETS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of ``budget.threshold_crossed`` (100 % opens an incident)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("budget.threshold_crossed", tenant_id),),
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant_id: TenantId
    incident_id: UUID


class GetRequest(_Request):
    """``get``."""


class AcknowledgeRequest(_Request):
    """``acknowledge``."""

    by: str = Field(min_length=1, max_length=MAX_BY)


class ResolveRequest(_Request):
    """``resolve``."""

    by: str = Field(min_length=1, max_length=MAX_BY)
    resolution: str = Field(min_length=1, max_length=MAX_RESOLUTION)


def build_rpc(server: RpcServer, handlers: IncidentHandlers) -> RpcServer:
    """Register the incident routes on ``server``."""

    @server.handler("acknowledge")
    async def acknowledge(req: AcknowledgeRequest, meta: Meta) -> dict[str, Any]:
        """Acknowledge an open incident."""
        state = await handlers.acknowledge(req.tenant_id, str(req.incident_id), req.by, meta)
        return state.to_dict()

    @server.handler("resolve")
    async def resolve(req: ResolveRequest, meta: Meta) -> dict[str, Any]:
        """Resolve an incident with a resolution note."""
        state = await handlers.resolve(
            req.tenant_id, str(req.incident_id), req.by, req.resolution, meta
        )
        return state.to_dict()

    @server.handler("get")
    async def get(req: GetRequest) -> dict[str, Any]:
        """One incident."""
        return (await handlers.get(req.tenant_id, str(req.incident_id))).to_dict()

    return server
