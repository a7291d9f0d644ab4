"""Replay and full exports of runs and workflow executions, and export jobs (``/v1/exports``).

An export is NDJSON: the subject's events with their hashes, the newest signed checkpoint and each
stream head's inclusion proof (``docs/audit.md``; ``mctl verify-export`` checks one offline).
Answers larger than a NATS message come from audit-replay in parts (reads take them whole, see
:mod:`libs.eventbus.rpc`); a job's file is streamed to the client a part at a time, so no size
answers 413.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, and some of
# them name the dependencies local to export_routes.

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.limits import UUID_PATTERN
from services.gateway.schemas import ID_PATTERN
from services.gateway.workflows import EXECUTION_ID_PATTERN, ExecutionIdPath

EXPORT_TIMEOUT_S = 60.0
NDJSON = "application/x-ndjson"


async def job_parts(
    call: Callable[[str, str, dict[str, Any]], Awaitable[Any]],
    method: str,
    job_id: str,
    decode: Callable[[dict[str, Any]], bytes],
) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
    """A done audit-replay job's first part and the bytes of all its parts, each asked for with
    ``method`` when the response reaches it (exports and evidence jobs keep their files in parts).

    The first part is asked for before anything is sent, so its refusal (404, 409 while the job
    is not done) is the response's status rather than a cut file.
    """
    first: dict[str, Any] = await call("audit", method, {"job_id": job_id, "seq": 0})

    async def parts() -> AsyncIterator[bytes]:
        part = first
        while True:
            yield decode(part)
            if part.get("next") is None:
                return
            part = await call("audit", method, {"job_id": job_id, "seq": part["next"]})

    return first, parts()


JOB_ID_PATTERN = UUID_PATTERN
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The export job's id.")]
Position = Annotated[int | None, Query(ge=1, le=2**62)]
SubjectType = Literal["run", "execution"]


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class ExportJobIn(BaseModel):
    """What to export: a run or a workflow execution of the tenant."""

    model_config = ConfigDict(extra="forbid")

    subject_type: SubjectType
    subject_id: Annotated[str, StringConstraints(pattern=EXECUTION_ID_PATTERN)] = Field(
        description="The run's or the execution's id."
    )


class ExportSubject(_Result):
    type: SubjectType
    id: str


class ExportProgress(_Result):
    """Events written of the total the subject's streams held when the job started."""

    done: int
    total: int


class ExportJob(_Result):
    """An export job: ``queued``, ``running``, ``done`` (download it) or ``failed`` (``error``
    says why)."""

    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    subject: ExportSubject
    requested_by: str
    progress: ExportProgress
    bytes: int
    parts: int
    attempts: int
    checkpoint_seq: int | None
    error: str | None
    created_at: str
    updated_at: str


class ExportJobList(_Result):
    jobs: list[ExportJob]


class ExecutionStepState(_Result):
    step_id: str
    status: str | None
    attempts: int
    run_ids: list[str]


class ExecutionState(_Result):
    execution_id: str
    workflow_id: str | None
    workflow_version: int | None
    status: str | None
    steps: list[ExecutionStepState]


class ExecutionInflection(_Result):
    """Where the execution went wrong: the first failed, blocked, stopped or rejected step, an
    exceeded budget, or the execution's failure or abort."""

    kind: str
    event_type: str
    step_id: str | None
    position: int | None
    stream_version: int
    occurred_at: str
    reason: Any = None


class ExecutionReplayResponse(_Result):
    """The execution folded from its stream up to a point."""

    state: ExecutionState
    events_applied: int
    inflection_point: ExecutionInflection | None
    at_position: int
    at_version: int


class ExportRecord(_Result):
    """One line of an export (NDJSON): ``kind`` is ``header``, ``event`` (with ``event``,
    ``prev_hash``, ``hash`` and ``hash_scheme``), ``checkpoint`` (the signed
    ``anchor.checkpointed`` event, same fields), ``proof`` (``stream_id``, ``anchored``,
    ``head_version``, ``head_hash``, ``leaf_index``, ``tree_size``, ``path``) or ``end``
    (``events`` and each stream's last ``version`` and ``hash``)."""

    kind: Literal["header", "event", "checkpoint", "proof", "end"]


_NDJSON_FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ExportRecord,
        "description": "NDJSON (application/x-ndjson), one record a line: the header, the "
        "events with prev_hash, hash and hash_scheme, the signed checkpoint, the inclusion "
        "proofs, and the end record; `mctl verify-export` checks it offline.",
        "content": {NDJSON: {"schema": {"type": "string"}}},
    }
}


def _file(name: str, result: Any) -> Response:
    body = result.get("body", "") if isinstance(result, dict) else ""
    return Response(
        body,
        media_type=NDJSON,
        headers={"Content-Disposition": f'attachment; filename="{name}.ndjson"'},
    )


def export_routes(router: APIRouter, read: Any, export: Any) -> None:
    """Add the replay, export and export-job routes to ``router``; ``read`` and ``export`` are
    the caller dependencies of those permissions."""
    Read = Annotated[Any, Depends(read)]
    Export = Annotated[Any, Depends(export)]
    tags: list[str | Any] = ["exports"]

    @router.get(
        "/runs/{run_id}/full-export", tags=tags, responses=_NDJSON_FILE, response_class=Response
    )
    async def export_run_events(
        run_id: Annotated[str, Path(pattern=ID_PATTERN, description="The run's id.")],
        call: Read,
    ) -> Response:
        """The run's full export: every event of its run, decisions, cost and incident streams
        with their hashes, and the proof up to the newest signed checkpoint."""
        payload = {"subject_type": "run", "subject_id": run_id}
        result = await call("audit", "export_events", payload, timeout=EXPORT_TIMEOUT_S)
        return _file(f"run-{run_id}", result)

    @router.get(
        "/executions/{execution_id}/replay", response_model=ExecutionReplayResponse, tags=tags
    )
    async def replay_execution(
        execution_id: ExecutionIdPath,
        call: Read,
        at_position: Position = None,
        at_version: Position = None,
    ) -> Any:
        """The execution as it stood at a store position or stream version, rebuilt from its
        events, with its inflection point."""
        query = {"execution_id": execution_id, "at_position": at_position, "at_version": at_version}
        return await call.answer(
            "audit", "replay_execution", {k: v for k, v in query.items() if v is not None}
        )

    @router.get(
        "/executions/{execution_id}/full-export",
        tags=tags,
        responses=_NDJSON_FILE,
        response_class=Response,
    )
    async def export_execution_events(execution_id: ExecutionIdPath, call: Read) -> Response:
        """The execution's full export: its stream and every stream of its attempts' runs, with
        their hashes and the proof up to the newest signed checkpoint."""
        payload = {"subject_type": "execution", "subject_id": execution_id}
        result = await call("audit", "export_events", payload, timeout=EXPORT_TIMEOUT_S)
        return _file(f"execution-{execution_id}", result)

    @router.post("/exports", response_model=ExportJob, status_code=202, tags=tags)
    async def create_export(body: ExportJobIn, call: Export) -> Any:
        """Start building an export in the background; poll ``GET /v1/exports/{job_id}`` and
        download it from ``/v1/exports/{job_id}/download`` once ``done``."""
        payload = {**body.model_dump(), "requested_by": call.actor}
        return await call.answer("audit", "export_job_create", payload, status=202)

    @router.get("/exports", response_model=ExportJobList, tags=tags)
    async def list_exports(call: Read, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Any:
        """The tenant's export jobs, newest first."""
        return await call.answer("audit", "export_jobs", {"limit": limit})

    @router.get("/exports/{job_id}", response_model=ExportJob, tags=tags)
    async def get_export(job_id: JobIdPath, call: Read) -> Any:
        """An export job's status and progress (events written of the total)."""
        return await call.answer("audit", "export_job", {"job_id": job_id})

    @router.get(
        "/exports/{job_id}/download",
        tags=tags,
        responses=_NDJSON_FILE,
        response_class=StreamingResponse,
    )
    async def download_export(job_id: JobIdPath, call: Read) -> Response:
        """A done job's file, streamed a part at a time (409 while it is not done)."""
        _, parts = await job_parts(
            call, "export_job_part", job_id, lambda part: str(part["data"]).encode()
        )
        return StreamingResponse(
            parts,
            media_type=NDJSON,
            headers={"Content-Disposition": f'attachment; filename="export-{job_id}.ndjson"'},
        )
