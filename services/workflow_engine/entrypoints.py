"""The workflow-engine's request routes (``mc.rpc.workflow.<method>``) and its consumer spec."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts import new_uuid7
from libs.contracts.envelope import TenantId
from libs.contracts.events import StepStatus
from libs.contracts.limits import (
    MAX_AGENT_ID,
    MAX_KIND,
    MAX_LABELS,
    MAX_NAME,
    MAX_REASON,
    RUN_ID_PATTERN,
)
from libs.contracts.subjects import events_filter
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import Meta, RpcServer
from services.workflow_engine.domain import RecordStep
from services.workflow_engine.handlers import WorkflowHandlers

RPC_SERVICE = "workflow"
VIOLATIONS_DURABLE = "workflow-violations"
APPLIED_TABLE = "workflow.applied_events"
MAX_BATCH = 1000


def violation_consumer_spec(
    durable: str = VIOLATIONS_DURABLE, tenant_id: str = "*"
) -> ConsumerSpec:
    """The durable consumer of ``policy.violation_detected`` (tests narrow durable and tenant)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("policy.violation_detected", tenant_id),),
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant_id: TenantId


class StartRunRequest(_Request):
    """``start_run``: a run id is generated (UUIDv7) when the caller gives none."""

    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    agent_id: str = Field(min_length=1, max_length=MAX_AGENT_ID)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)


class StepItem(BaseModel):
    """One step outcome in ``record_steps``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    step_index: int = Field(ge=1)
    kind: str = Field(default="llm_call", min_length=1, max_length=MAX_KIND)
    model: str | None = Field(default=None, max_length=MAX_NAME)
    tool: str | None = Field(default=None, max_length=MAX_NAME)
    status: StepStatus = "ok"
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    duration_ms: float = Field(default=0, ge=0)
    input: Any = None
    output: Any = None
    error: str | None = None

    def command(self) -> RecordStep:
        """The domain command."""
        return RecordStep(**self.model_dump())


class RecordStepsRequest(_Request):
    """``record_steps``: a batch of step outcomes, possibly of many runs."""

    items: list[StepItem] = Field(min_length=1, max_length=MAX_BATCH)


class FinishRunRequest(_Request):
    """``finish_run``."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    status: Literal["completed", "failed"]
    reason: str | None = Field(default=None, max_length=MAX_REASON)


class GetRunRequest(_Request):
    """``get_run``."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)


def build_rpc(server: RpcServer, handlers: WorkflowHandlers) -> RpcServer:
    """Register the workflow routes on ``server``."""

    @server.handler("start_run")
    async def start_run(req: StartRunRequest, meta: Meta) -> Any:
        """Start a run (its id generated when the caller gives none)."""
        return await handlers.start_run(
            req.tenant_id, req.run_id or str(new_uuid7()), req.agent_id, req.labels, meta
        )

    @server.handler("record_steps")
    async def record_steps(req: RecordStepsRequest, meta: Meta) -> Any:
        """Record a batch of step outcomes, possibly of many runs."""
        return await handlers.record_steps(req.tenant_id, [i.command() for i in req.items], meta)

    @server.handler("finish_run")
    async def finish_run(req: FinishRunRequest, meta: Meta) -> Any:
        """Finish a run as completed or failed."""
        return await handlers.finish_run(req.tenant_id, req.run_id, req.status, req.reason, meta)

    @server.handler("get_run")
    async def get_run(req: GetRunRequest) -> Any:
        """A run's state."""
        state = await handlers.get_run(req.tenant_id, req.run_id)
        return state.to_dict()

    return server
