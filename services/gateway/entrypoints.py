"""The public HTTP API (``/v1``): authentication, request validation, error mapping, and one RPC
per endpoint to the service that owns the answer.

Every RPC carries the tenant of the API key that authenticated the request, never one from the
request body, so a key of tenant A cannot name, read or change anything of tenant B: the services
behind the gateway answer "not found" for B's ids.

Errors leave in one shape, ``{"error": {"code", "message"}}``, from one place
(:class:`GatewayRoute`): project errors with their ``http_status``, validation errors as 422 naming
the fields, bodies over :data:`MAX_BODY_BYTES` as 413, and anything unexpected as a logged 500
with a generic message.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the dependency annotations of
# the route functions at import time, and some of them name objects local to build_router.

import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import orjson
import structlog
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from nats.errors import MaxPayloadError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException

from libs import errors
from libs.contracts import new_uuid7
from libs.eventbus.rpc import RpcClient
from libs.observability import extract_context, inject_headers
from services.gateway.keys import KeyVerifier, Principal
from services.gateway.schemas import (
    AGENT_ID_PATTERN,
    ID_PATTERN,
    MAX_PAGE,
    POLICY_ID_PATTERN,
    AcknowledgeRequest,
    AdmissionRequest,
    AdmissionResponse,
    CostGrouping,
    ErrorResponse,
    ExportFormat,
    FinishRunRequest,
    IncidentStatus,
    ResolveRequest,
    RunFinishedResponse,
    RunStartedResponse,
    RunStatusFilter,
    SetPricesRequest,
    StartRunRequest,
    StepBatchRequest,
    StepFields,
    StepsRecordedResponse,
)
from services.gateway.shedding import RETRY_AFTER_S
from services.gateway.work import work_queues
from services.gateway.workflows import (
    DOCUMENT_BODY,
    MAX_WAIT_S,
    AbortExecutionRequest,
    AgentNamePath,
    BudgetScope,
    ExecutionIdPath,
    ExecutionStatus,
    RegisterAgentRequest,
    SetBudgetRequest,
    SetBudgetTimezoneRequest,
    StartExecutionRequest,
    WorkflowIdPath,
    read_document,
)

log = structlog.get_logger("gateway")
_tracer = trace.get_tracer("mission-control.gateway")

MAX_BODY_BYTES = 10 * 1024 * 1024
CORRELATION_HEADER = "X-Correlation-Id"
_CORRELATION_MAX = 200
_CORRELATION_ALPHABET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
)
# Long-running admin and export calls get more than the RPC client's default deadline.
EXPORT_TIMEOUT_S = 60.0
REBUILD_TIMEOUT_S = 600.0
_MAX_REPORTED_FIELDS = 10
# workflow-engine takes at most 1,000 steps per record_steps; NATS messages are capped at 8 MB.
RPC_BATCH_ITEMS = 1000
RPC_BATCH_BYTES = 4 * 1024 * 1024
ADMIN_HEADER = "X-Admin-Token"


# --- errors ---------------------------------------------------------------------------------------


class PayloadTooLarge(errors.PermanentError):
    """The request body is larger than the gateway accepts."""

    code = "payload_too_large"
    http_status = 413


class Forbidden(errors.PermanentError):
    """The caller is authenticated but may not do this (operator-only routes)."""

    code = "forbidden"
    http_status = 403


def require_admin_token(configured: str | None, given: str | None) -> None:
    """Let an operator-only request through only with the configured operator token.

    No token configured disables the admin routes altogether: an API key is a tenant's
    credential, and these routes act on every tenant's data.
    """
    if not configured:
        raise Forbidden("admin operations are disabled: set MC_ADMIN_TOKEN")
    if not given or not secrets.compare_digest(given.encode(), configured.encode()):
        raise Forbidden(f"missing or wrong operator token in the {ADMIN_HEADER} header")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body of the API."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def overloaded_response(message: str) -> JSONResponse:
    """429 with ``Retry-After``: over an in-flight bound, the gateway's or a service's."""
    return error_response(429, errors.Overloaded.code, message, {"Retry-After": str(RETRY_AFTER_S)})


def validation_message(exc: RequestValidationError) -> str:
    """``invalid request: body.items.0.input_tokens: Input should be ...; ...``."""
    parts: list[str] = []
    errs = list(exc.errors())
    for err in errs[:_MAX_REPORTED_FIELDS]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "json_invalid":
            parts.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'malformed')})")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    if len(errs) > _MAX_REPORTED_FIELDS:
        parts.append(f"... and {len(errs) - _MAX_REPORTED_FIELDS} more")
    return "invalid request: " + "; ".join(parts)


def map_exception(exc: BaseException) -> JSONResponse:
    """The response for an exception raised while handling a request."""
    if isinstance(exc, HTTPException) and isinstance(exc.__cause__, errors.MissionControlError):
        # FastAPI wraps whatever reading the body raised (our size limit) in a 400.
        exc = exc.__cause__
    if isinstance(exc, RequestValidationError):
        return error_response(422, "invalid_input", validation_message(exc))
    if isinstance(exc, errors.Overloaded):
        return overloaded_response(str(exc))
    if isinstance(exc, errors.MissionControlError) and exc.http_status < 500:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthorized) else None
        return error_response(exc.http_status, exc.code, str(exc), headers)
    if isinstance(exc, errors.MissionControlError) and type(exc) is not errors.MissionControlError:
        # Unavailable / deadline exceeded: the caller may retry, so say so plainly.
        return error_response(exc.http_status, exc.code, str(exc))
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail))
    # A bug or an unexpected upstream failure: log the details, tell the caller nothing internal.
    log.error("gateway.unhandled_error", exc_info=exc)
    return error_response(500, "internal", "internal error; see the gateway log for details")


# --- request plumbing -----------------------------------------------------------------------------


class _LimitedRequest(Request):
    """A request whose body is read at most up to :data:`MAX_BODY_BYTES` (also when chunked)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            chunks: list[bytes] = []
            size = 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body


def _correlation_id(request: Request) -> str:
    return correlation_id_from(request.headers.get(CORRELATION_HEADER, ""))


def correlation_id_from(given: str) -> str:
    """The caller's correlation id when it is a sane one, else a new one."""
    if 0 < len(given) <= _CORRELATION_MAX and set(given) <= _CORRELATION_ALPHABET:
        return given
    return str(new_uuid7())


def _rpc_headers(correlation_id: str) -> dict[str, str]:
    headers = inject_headers({"Mc-Correlation-Id": correlation_id})
    if "traceparent" not in headers:
        # No tracing SDK and no caller trace: start a trace here, so the services' logs and the
        # events they append can still be joined on one trace id.
        headers["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    return headers


class GatewayRoute(APIRoute):
    """Every ``/v1`` route: body limit, correlation id, trace span, and the error mapping.

    Load shedding and request metrics sit in front of the routes, in
    :class:`services.gateway.middleware.LoadShedding`, so a refused request costs no routing.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        span_name = f"{next(iter(self.methods or {'GET'}))} {self.path}"

        async def route(request: Request) -> Response:
            correlation_id = _correlation_id(request)
            response = await _handle(request, handle, span_name, correlation_id)
            response.headers[CORRELATION_HEADER] = correlation_id
            return response

        return route


async def _handle(
    request: Request,
    handle: Callable[[Request], Coroutine[Any, Any, Response]],
    span_name: str,
    correlation_id: str,
) -> Response:
    """Run the route's own handler under the body limit and a trace span; map what it raises."""
    try:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        limited = _LimitedRequest(request.scope, request.receive)
        # Errors the API answers (4xx) are outcomes, not faults: no stack trace in the span.
        with _tracer.start_as_current_span(
            span_name,
            context=extract_context(request.headers),
            kind=SpanKind.SERVER,
            record_exception=False,
        ):
            limited.state.rpc_headers = _rpc_headers(correlation_id)
            return await handle(limited)
    except Exception as exc:
        return map_exception(exc)


@dataclass(frozen=True)
class Caller:
    """An authenticated request's way to the services: every call carries its tenant."""

    principal: Principal
    rpc: RpcClient
    headers: dict[str, str]

    async def __call__(
        self,
        service: str,
        method: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Call ``service.method`` with ``payload`` plus the key's tenant."""
        # The tenant goes last so nothing in the payload can replace it.
        body = {**(payload or {}), "tenant_id": self.principal.tenant_id}
        try:
            return await self.rpc.call(service, method, body, timeout=timeout, headers=self.headers)
        except MaxPayloadError:
            raise PayloadTooLarge(
                "the request is too large to forward in one message; send fewer or smaller items"
            ) from None

    async def answer(
        self, service: str, method: str, payload: dict[str, Any] | None = None, status: int = 200
    ) -> Response:
        """:meth:`__call__`'s result as the HTTP answer, as it came.

        The services answer in the documented shapes already; encoding their result once with
        orjson spares FastAPI's response-model validation and ``jsonable_encoder`` walk, which
        cost more than the rest of the gateway's work on the hot path.
        """
        return json_response(await self(service, method, payload), status)

    @property
    def actor(self) -> str:
        """How this caller is named in the records it causes."""
        return f"api-key:{self.principal.key_id}"


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="mc_<key_id>_<secret>",
    description="An API key issued by `mctl tenant create` or `mctl tenant key`.",
)
_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="The same API key, for clients that cannot set Authorization.",
)

RunIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="The run's id.")]
IncidentIdPath = Annotated[UUID, Path(description="The incident's id.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
OptionalId = Annotated[str | None, Query(pattern=ID_PATTERN)]
OptionalAgentId = Annotated[str | None, Query(pattern=AGENT_ID_PATTERN)]
OptionalPolicyId = Annotated[str | None, Query(pattern=POLICY_ID_PATTERN)]
StorePosition = Annotated[int | None, Query(ge=1, le=2**63 - 1)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or revoked API key."},
    404: {"model": ErrorResponse, "description": "Not found (or not visible to this tenant)."},
    409: {"model": ErrorResponse, "description": "Conflicts with the current state."},
    413: {"model": ErrorResponse, "description": "Request body larger than 10 MB."},
    422: {"model": ErrorResponse, "description": "Invalid request; the message names the fields."},
    429: {
        "model": ErrorResponse,
        "description": "Over the gateway's or a service's bound of requests in flight; refused "
        "at once, not queued. Retry after the `Retry-After` header's seconds.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"},
            }
        },
    },
    503: {"model": ErrorResponse, "description": "A service behind the gateway is unavailable."},
    504: {"model": ErrorResponse, "description": "A service did not answer in time."},
}


def json_response(value: Any, status: int = 200) -> Response:
    """``value`` encoded with orjson, as an ``application/json`` answer."""
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def _json_body(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"result": value}


def build_router(rpc: Callable[[], RpcClient], keys: Callable[[], KeyVerifier]) -> APIRouter:
    """The ``/v1`` routes; ``rpc`` and ``keys`` give the started service's clients per request."""

    async def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Caller:
        token = bearer.credentials if bearer is not None else api_key
        if not token:
            raise errors.Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        principal = await keys().verify(token)
        return Caller(principal, rpc(), request.state.rpc_headers)

    Call = Annotated[Caller, Depends(caller)]
    router = APIRouter(prefix="/v1", route_class=GatewayRoute, responses=_ERRORS)

    # -- runs and steps ----------------------------------------------------------------------------

    @router.post("/runs", status_code=201, response_model=RunStartedResponse, tags=["runs"])
    async def start_run(body: StartRunRequest, call: Call) -> Any:
        """Start a run of an agent."""
        payload = body.model_dump(mode="json", exclude_none=True)
        return await call.answer("workflow", "start_run", payload, status=201)

    @router.post("/runs/{run_id}/admissions", response_model=AdmissionResponse, tags=["runs"])
    async def admit(run_id: RunIdPath, body: AdmissionRequest, call: Call) -> Any:
        """Ask, before running a step, whether it may run. ``deny`` means: do not run it."""
        return await call.answer(
            "admission", "admit", {"run_id": run_id, **body.model_dump(mode="json")}
        )

    @router.post(
        "/runs/{run_id}/steps",
        status_code=201,
        response_model=StepsRecordedResponse,
        tags=["runs"],
    )
    async def record_step(run_id: RunIdPath, body: StepFields, call: Call) -> Any:
        """Record the outcome of one step of a run."""
        item = {"run_id": run_id, **body.model_dump(mode="json")}
        return await call.answer("workflow", "record_steps", {"items": [item]}, status=201)

    @router.post(
        "/steps:batch", status_code=201, response_model=StepsRecordedResponse, tags=["runs"]
    )
    async def record_steps_batch(body: StepBatchRequest, call: Call) -> Any:
        """Record up to 5,000 steps of any of the tenant's runs in one request.

        The steps are forwarded in chunks of at most 1,000 (and a few MB), in order; each chunk is
        recorded atomically. If a chunk fails, the chunks before it stay recorded and the error
        names how many steps were; recording the same step again is refused, not duplicated.
        """
        recorded, positions = 0, []
        for chunk in batch_chunks(body.model_dump(mode="json")["items"]):
            try:
                result = await call("workflow", "record_steps", {"items": chunk})
            except errors.MissionControlError as exc:
                if recorded:
                    exc.args = (f"{exc} (the first {recorded} steps of the batch were recorded)",)
                raise
            recorded += int(result.get("recorded", len(chunk)))
            positions += list(result.get("positions", []))
        return json_response({"recorded": recorded, "positions": positions}, 201)

    @router.post("/runs/{run_id}/finish", response_model=RunFinishedResponse, tags=["runs"])
    async def finish_run(run_id: RunIdPath, body: FinishRunRequest, call: Call) -> Any:
        """End a run as ``completed`` or ``failed``."""
        return await call.answer("workflow", "finish_run", {"run_id": run_id, **body.model_dump()})

    @router.get("/runs", tags=["runs"])
    async def list_runs(
        call: Call,
        status: RunStatusFilter | None = None,
        agent_id: OptionalAgentId = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Any:
        """Runs of the tenant, newest first; ``status=live`` means running."""
        query = {"status": status, "agent_id": agent_id, "limit": limit, "offset": offset}
        return await call.answer("audit", "runs", _present(query))

    @router.get("/runs/{run_id}", tags=["runs"])
    async def get_run(run_id: RunIdPath, call: Call) -> Any:
        """One run: status, steps, tokens, cost, and where it stopped."""
        return await call.answer("audit", "run", {"run_id": run_id})

    @router.get("/runs/{run_id}/trace", tags=["runs"])
    async def get_trace(run_id: RunIdPath, call: Call) -> Any:
        """The run's steps and decisions in order, with its inflection point."""
        return await call.answer("audit", "trace", {"run_id": run_id})

    @router.get("/runs/{run_id}/replay", tags=["runs"])
    async def replay_run(
        run_id: RunIdPath,
        call: Call,
        at_position: StorePosition = None,
        at_version: StorePosition = None,
    ) -> Any:
        """The run as it stood at a store position or stream version, rebuilt from the log."""
        query = {"run_id": run_id, "at_position": at_position, "at_version": at_version}
        return await call.answer("audit", "replay", _present(query))

    @router.get(
        "/runs/{run_id}/export",
        tags=["runs"],
        responses={
            200: {
                "description": "The run's audit record as a file.",
                "content": {"application/json": {}, "text/csv": {}},
            }
        },
    )
    async def export_run(run_id: RunIdPath, call: Call, format: ExportFormat = "json") -> Response:
        """The run's complete audit record (events, decisions, costs) as JSON or CSV."""
        result = await call(
            "audit", "export", {"run_id": run_id, "format": format}, timeout=EXPORT_TIMEOUT_S
        )
        return export_response(run_id, format, result)

    # -- incidents ---------------------------------------------------------------------------------

    @router.get("/incidents", tags=["incidents"])
    async def list_incidents(
        call: Call,
        status: IncidentStatus | None = None,
        run_id: OptionalId = None,
        policy_id: OptionalPolicyId = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Any:
        """Incidents of the tenant, newest first."""
        query = {
            "status": status,
            "run_id": run_id,
            "policy_id": policy_id,
            "limit": limit,
            "offset": offset,
        }
        return await call.answer("audit", "incidents", _present(query))

    @router.get("/incidents/{incident_id}", tags=["incidents"])
    async def get_incident(incident_id: IncidentIdPath, call: Call) -> Any:
        """One incident with its history."""
        return await call.answer("audit", "incident", {"incident_id": str(incident_id)})

    @router.post("/incidents/{incident_id}/acknowledge", tags=["incidents"])
    async def acknowledge_incident(
        incident_id: IncidentIdPath,
        call: Call,
        body: Annotated[AcknowledgeRequest | None, Body()] = None,
    ) -> Any:
        """Take ownership of an incident (the body, and ``by`` in it, may be left out)."""
        by = body.by if body is not None else None
        payload = {"incident_id": str(incident_id), "by": by or call.actor}
        return await call.answer("incident", "acknowledge", payload)

    @router.post("/incidents/{incident_id}/resolve", tags=["incidents"])
    async def resolve_incident(
        incident_id: IncidentIdPath, body: ResolveRequest, call: Call
    ) -> Any:
        """Close an incident, recording the resolution."""
        payload = {
            "incident_id": str(incident_id),
            "by": body.by or call.actor,
            "resolution": body.resolution,
        }
        return await call.answer("incident", "resolve", payload)

    # -- policies, costs, prices -------------------------------------------------------------------

    @router.get("/policies", tags=["policies"])
    async def list_policies(call: Call) -> Any:
        """The active bundle's policies, with how many incidents each has caused."""
        return await call.answer("audit", "policies")

    @router.get("/costs", tags=["costs"])
    async def costs(call: Call, group_by: CostGrouping = "run", run_id: OptionalId = None) -> Any:
        """Cost of the tenant's runs, grouped by run, agent or model."""
        return await call.answer(
            "audit", "costs", _present({"group_by": group_by, "run_id": run_id})
        )

    @router.get("/prices", tags=["costs"])
    async def prices(call: Call) -> Any:
        """The tenant's price table (custom prices over the defaults) and its version."""
        return await call.answer("cost", "prices")

    @router.put("/prices", tags=["costs"])
    async def set_prices(body: SetPricesRequest, call: Call) -> Any:
        """Publish a new version of the tenant's custom price table."""
        payload = {**body.model_dump(mode="json", exclude_none=True), "actor": call.actor}
        return await call.answer("cost", "set_prices", payload)

    # -- admin -------------------------------------------------------------------------------------

    @router.post(
        "/admin/rebuild-projections",
        status_code=202,
        tags=["admin"],
        responses={
            403: {
                "model": ErrorResponse,
                "description": "No operator token configured (MC_ADMIN_TOKEN), or a wrong one.",
            }
        },
    )
    async def rebuild_projections(
        request: Request,
        call: Call,
        admin_token: Annotated[
            str | None,
            Header(
                alias=ADMIN_HEADER,
                description="The operator token the gateway was started with (MC_ADMIN_TOKEN).",
            ),
        ] = None,
    ) -> Any:
        """Drop and rebuild every query projection from the event store (operators only).

        The projections of all tenants share one database, so besides an API key this needs the
        operator token: set `MC_ADMIN_TOKEN` in the gateway's environment and send it in the
        `X-Admin-Token` header. Without a configured token the route answers 403 ("admin
        operations are disabled"). While the rebuild runs, queries of every tenant answer 503
        `unavailable` ("projections are being rebuilt, retry shortly") rather than partial data.
        """
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None:
            raise errors.TransientError("the gateway is not started")
        configured = ctx.settings.admin_token
        require_admin_token(configured.get_secret_value() if configured else None, admin_token)
        return _json_body(await call("audit", "rebuild", timeout=REBUILD_TIMEOUT_S))

    # -- agents, workflows and executions ---------------------------------------------------------

    @router.post("/agents", status_code=201, tags=["workflows"])
    async def register_agent(body: RegisterAgentRequest, call: Call) -> Any:
        """Register an agent in the tenant's catalogue (registering it again changes nothing)."""
        payload = body.model_dump()
        return await call.answer("workflow", "register_agent", payload, status=201)

    @router.post(
        "/agents/{agent_id}/work:take",
        tags=["workflows"],
        responses={204: {"description": "No work arrived within `wait_s`."}},
    )
    async def take_work(
        agent_id: AgentNamePath,
        request: Request,
        call: Call,
        wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 20.0,
    ) -> Response:
        """Take the agent's next dispatched step (a long poll of up to ``wait_s`` seconds).

        The item names the attempt's run: ask admission for each call, record each call and
        finish the run. An item is handed over once; a worker that loses it leaves the attempt
        to time out, and the engine dispatches the next attempt.
        """
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None:
            raise errors.TransientError("the gateway is not started")
        item = await work_queues(ctx.js).take(call.principal.tenant_id, agent_id, wait_s)
        if item is None:
            return Response(status_code=204)
        return json_response(item)

    @router.get("/agents", tags=["workflows"])
    async def list_agents(call: Call) -> Any:
        """The tenant's registered agents."""
        return await call.answer("workflow", "list_agents")

    @router.post("/workflows", tags=["workflows"], openapi_extra=DOCUMENT_BODY)
    async def save_workflow(
        request: Request,
        call: Call,
        base_version: Annotated[int | None, Query(ge=0)] = None,
    ) -> Response:
        """Validate a workflow document and save it as its workflow's next version.

        Every problem is named at once: a cycle (``a → b → c → a``), a dependency on a missing
        step, an unregistered agent. Saving a document equal to the newest version changes
        nothing (200, ``created: false``); a new version answers 201. With ``base_version``,
        saving fails with 409 if someone saved a newer version meanwhile.
        """
        payload: dict[str, Any] = {"document": await read_document(request)}
        if base_version is not None:
            payload["base_version"] = base_version
        result = await call("workflow", "save_workflow", payload)
        return Response(
            orjson.dumps(result),
            status_code=201 if result.get("created") else 200,
            media_type="application/json",
        )

    @router.get("/workflows", tags=["workflows"])
    async def list_workflows(call: Call) -> Any:
        """The tenant's workflows, newest version of each."""
        return await call.answer("workflow", "list_workflows")

    @router.get("/workflows/{workflow_id}", tags=["workflows"])
    async def get_workflow(
        workflow_id: WorkflowIdPath,
        call: Call,
        version: Annotated[int | None, Query(ge=1)] = None,
    ) -> Any:
        """One version of a workflow (the newest by default) with its document."""
        payload: dict[str, Any] = {"workflow_id": workflow_id}
        if version is not None:
            payload["version"] = version
        return await call.answer("workflow", "get_workflow", payload)

    @router.get("/workflows/{workflow_id}/diff", tags=["workflows"])
    async def diff_workflow(
        workflow_id: WorkflowIdPath,
        call: Call,
        from_version: Annotated[int, Query(ge=1)],
        to_version: Annotated[int | None, Query(ge=1)] = None,
    ) -> Any:
        """Steps added and removed and each changed field between two versions."""
        payload: dict[str, Any] = {"workflow_id": workflow_id, "from_version": from_version}
        if to_version is not None:
            payload["to_version"] = to_version
        return await call.answer("workflow", "diff_workflow", payload)

    @router.post("/workflows/{workflow_id}/executions", status_code=201, tags=["workflows"])
    async def start_execution(
        workflow_id: WorkflowIdPath, body: StartExecutionRequest, call: Call
    ) -> Any:
        """Start an execution; the steps with no dependencies are dispatched at once."""
        payload = {"workflow_id": workflow_id, **body.model_dump(mode="json", exclude_none=True)}
        return await call.answer("workflow", "start_execution", payload, status=201)

    @router.get("/executions", tags=["workflows"])
    async def list_executions(
        call: Call,
        status: ExecutionStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        """The tenant's executions, newest first."""
        payload: dict[str, Any] = {"limit": limit}
        if status is not None:
            payload["status"] = status
        return await call.answer("workflow", "list_executions", payload)

    @router.get("/executions/{execution_id}", tags=["workflows"])
    async def get_execution(execution_id: ExecutionIdPath, call: Call) -> Any:
        """An execution: its DAG with each step's state, attempt, run and duration."""
        return await call.answer("workflow", "get_execution", {"execution_id": execution_id})

    @router.post("/executions/{execution_id}/abort", tags=["workflows"])
    async def abort_execution(
        execution_id: ExecutionIdPath, body: AbortExecutionRequest, call: Call
    ) -> Any:
        """Abort an execution: nothing more is dispatched and its running attempts' runs end."""
        payload = {"execution_id": execution_id, "reason": body.reason}
        return await call.answer("workflow", "abort_execution", payload)

    # -- budgets ------------------------------------------------------------------------------

    @router.put("/budgets", tags=["budgets"])
    async def set_budget(body: SetBudgetRequest, call: Call) -> Any:
        """Set a budget's cap (its id is ``scope[:subject]:window``); a new cap applies to the
        current window at once."""
        return await call.answer("workflow", "set_budget", body.model_dump(mode="json"))

    @router.get("/budgets", tags=["budgets"])
    async def list_budgets(
        call: Call,
        scope: BudgetScope | None = None,
        execution_id: Annotated[
            str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
        ] = None,
    ) -> Any:
        """Each budget with its current window's spent, reserved and remaining (per-execution
        windows: those of ``execution_id``)."""
        payload = _present({"scope": scope, "execution_id": execution_id})
        return await call.answer("workflow", "list_budgets", payload)

    @router.put("/budgets/timezone", tags=["budgets"])
    async def set_budget_timezone(body: SetBudgetTimezoneRequest, call: Call) -> Any:
        """Set the time zone of the tenant's day and month windows (default UTC)."""
        return await call.answer("workflow", "set_budget_timezone", body.model_dump())

    return router


def _present(query: dict[str, Any]) -> dict[str, Any]:
    """``query`` without the parameters the caller left out."""
    return {k: v for k, v in query.items() if v is not None}


def batch_chunks(
    items: list[dict[str, Any]],
    max_items: int = RPC_BATCH_ITEMS,
    max_bytes: int = RPC_BATCH_BYTES,
) -> list[list[dict[str, Any]]]:
    """``items`` in order, cut into chunks small enough for one request to workflow-engine."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for item in items:
        item_size = len(orjson.dumps(item))
        if current and (len(current) >= max_items or size + item_size > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        chunks.append(current)
    return chunks


def export_response(run_id: str, fmt: str, result: Any) -> Response:
    """The export RPC's result as a downloadable file.

    audit-replay answers ``{"content_type", "body"}`` with the file's text; a bare string or, for
    JSON, the document itself are accepted too.
    """
    media_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    content: str | bytes
    if isinstance(result, dict) and isinstance(result.get("body"), str):
        content = result["body"]
        media_type = str(result.get("content_type") or media_type)
    elif isinstance(result, str):
        content = result
    else:
        content = orjson.dumps(result)
    return Response(
        content,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="run-{run_id}.{fmt}"'},
    )
