"""The public HTTP API (``/v1``): authentication, request validation, error mapping, and one RPC
per endpoint to the service that owns the answer.

Every route declares the one permission it needs through its caller dependency (``Read``,
``Ingest``, ...: :class:`Requires`), which authenticates the API key or bearer token and checks the
permission against the caller's key scopes or roles (``services/gateway/rbac.py``). Every RPC
carries the tenant of the principal that authenticated the request, never one from the request
body, so a caller of tenant A cannot name, read or change anything of tenant B: the services
behind the gateway answer "not found" for B's ids. A person's requests also name them as the
actor (``Mc-Actor: user:<id>``) of every event they cause.

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
from pydantic import AwareDatetime
from starlette.exceptions import HTTPException

from libs import errors
from libs.contracts import new_uuid7
from libs.contracts.limits import AGENT_ID_PATTERN, MAX_STEP_INDEX
from libs.eventbus.rpc import RpcClient
from libs.observability import extract_context, inject_headers
from services.gateway.agents import agent_routes
from services.gateway.audit_search import audit_search_routes
from services.gateway.auth import TENANT_HEADER, Authenticator, whoami
from services.gateway.diffs import (
    DIFF_TIMEOUT_S,
    DiffAcknowledgements,
    DiffCursorQuery,
    DiffHashPath,
    DiffIn,
    DiffListing,
    DiffPage,
    LimitQuery,
    ViewQuery,
    diff_payload,
)
from services.gateway.directory import directory_routes
from services.gateway.evidence import evidence_routes
from services.gateway.exports import export_routes
from services.gateway.insights import insight_routes
from services.gateway.live import MAX_HEARTBEAT_S, MEDIA_TYPE, MIN_HEARTBEAT_S, Target, open_stream
from services.gateway.policy_bundles import (
    BUNDLE_BODY,
    UPLOAD_TIMEOUT_S,
    ActivateIn,
    BundleListing,
    BundleStored,
    ChaosIn,
    ChaosResult,
    DigestPath,
    DriftAcknowledgeIn,
    DriftAlignIn,
    EndCanaryIn,
    EnvironmentFreezeView,
    EnvironmentQuery,
    ExceptionIdPath,
    ExceptionStatusQuery,
    FreezeEnvironmentPath,
    FreezeOverrideIn,
    KeyIdPath,
    OptionalDigest,
    OptionalEnvironmentQuery,
    PolicyDriftView,
    PolicyExceptionIn,
    PolicyExceptionListing,
    PolicyExceptionView,
    PolicyFreezeView,
    PolicySettingsIn,
    PolicySettingsView,
    ReloadIdPath,
    ReloadListing,
    ReloadReport,
    RetireKeyIn,
    RevokeExceptionIn,
    SigningKeyIn,
    SigningKeyListing,
    WebhookCreated,
    WebhookDeleted,
    WebhookIdPath,
    WebhookIn,
    WebhookListing,
    read_bundle,
    settings_payload,
)
from services.gateway.policy_hooks import (
    HookPath,
    PolicyHookDecision,
    PolicyHookIn,
    hook_payload,
)
from services.gateway.policy_simulations import (
    CSV_MEDIA_TYPE,
    ListLimitQuery,
    PolicySimulationIn,
    PolicySimulationListing,
    PolicySimulationView,
    SimulationFormat,
    SimulationIdPath,
    SimulationStatus,
)
from services.gateway.promotions import promotion_routes
from services.gateway.rbac import Permission, Principal, authorize
from services.gateway.schemas import (
    ID_PATTERN,
    MAX_PAGE,
    POLICY_ID_PATTERN,
    AcknowledgeRequest,
    AdmissionRequest,
    AdmissionResponse,
    CostGrouping,
    CostsResponse,
    ErrorResponse,
    ExportFormat,
    FinishRunRequest,
    Incident,
    IncidentList,
    IncidentStatus,
    PoliciesResponse,
    PriceListing,
    PricesPublishedResponse,
    RebuildResponse,
    ReplayResponse,
    ResolveRequest,
    Run,
    RunFinishedResponse,
    RunList,
    RunStartedResponse,
    RunStatusFilter,
    SetPricesRequest,
    StartRunRequest,
    StepBatchRequest,
    StepFields,
    StepsRecordedResponse,
    StreamMessage,
    TokenRequest,
    TokenResponse,
    TraceResponse,
    UsageReport,
    UsageVerdict,
    WhoAmIResponse,
)
from services.gateway.shedding import RETRY_AFTER_S
from services.gateway.tokens import JWKS_PATH
from services.gateway.work import work_queues
from services.gateway.workflows import (
    DOCUMENT_BODY,
    MAX_VERSION,
    MAX_WAIT_S,
    NAME_PATTERN,
    AbortExecutionRequest,
    AgentListing,
    AgentNamePath,
    AgentRegisteredResponse,
    ApprovalDecision,
    ApprovalQueue,
    ApprovalRulesIn,
    ApprovalRulesView,
    BudgetListing,
    BudgetScope,
    BudgetSetResponse,
    BudgetTimezoneResponse,
    CursorQuery,
    ExecutionIdPath,
    ExecutionListing,
    ExecutionStatus,
    ExecutionView,
    RegisterAgentRequest,
    SetBudgetRequest,
    SetBudgetTimezoneRequest,
    StartExecutionRequest,
    StepIdPath,
    WorkflowDiff,
    WorkflowIdPath,
    WorkflowListing,
    WorkflowSaved,
    WorkflowVersion,
    WorkItem,
    approval_payload,
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
LIVE_SNAPSHOT_RUNS = 500
"""The most running runs the first message of ``GET /v1/live`` lists (audit-replay's page)."""


# --- errors ---------------------------------------------------------------------------------------


class PayloadTooLarge(errors.PermanentError):
    """The request body is larger than the gateway accepts."""

    code = "payload_too_large"
    http_status = 413


def require_admin_token(configured: str | None, given: str | None) -> None:
    """Let an operator-only request through only with the configured operator token.

    No token configured disables the admin routes altogether: an API key is a tenant's
    credential, and these routes act on every tenant's data.
    """
    if not configured:
        raise errors.Forbidden("admin operations are disabled: set MC_ADMIN_TOKEN")
    if not given or not secrets.compare_digest(given.encode(), configured.encode()):
        raise errors.Forbidden(f"missing or wrong operator token in the {ADMIN_HEADER} header")


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


def body_error_message(cause: BaseException) -> str:
    """Why a JSON body could not be read, without quoting it."""
    if isinstance(cause, UnicodeError):
        problem = "not valid UTF-8"
    elif isinstance(cause, RecursionError):
        problem = "nested too deeply"
    else:
        problem = "malformed"
    return f"invalid request: body: invalid JSON ({problem})"


def map_exception(exc: BaseException) -> JSONResponse:
    """The response for an exception raised while handling a request."""
    if isinstance(exc, HTTPException) and isinstance(exc.__cause__, errors.MissionControlError):
        # FastAPI wraps whatever reading the body raised (our size limit) in a 400.
        exc = exc.__cause__
    if isinstance(exc, RequestValidationError):
        return error_response(422, "invalid_input", validation_message(exc))
    if isinstance(exc, HTTPException) and exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI answers 400 when reading a JSON body raised anything but a JSON syntax error:
        # bytes that are not UTF-8, nesting past the parser's recursion limit. To the caller it is
        # the same mistake as malformed JSON, so it gets the same 422.
        return error_response(422, "invalid_input", body_error_message(exc.__cause__))
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
        """Call ``service.method`` with ``payload`` plus the principal's tenant."""
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
        return self.principal.actor


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="mc_<key_id>_<secret> or JWT",
    description="An API key issued by `mctl tenant create` or `mctl tenant key`, or a person's "
    "token (from `POST /v1/auth/token` or the configured OIDC provider).",
)
_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="The same API key, for clients that cannot set Authorization.",
)

RunIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="The run's id.")]
IncidentIdPath = Annotated[UUID, Path(description="The incident's id.")]
StepIndexPath = Annotated[
    int, Path(ge=1, le=MAX_STEP_INDEX, description="The call's step index in its run.")
]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=41,
        description="The `id:` of the last message received: the stream resumes right after it.",
    ),
]
HeartbeatS = Annotated[
    float | None,
    Query(
        ge=MIN_HEARTBEAT_S,
        le=MAX_HEARTBEAT_S,
        description="Seconds of silence before a heartbeat comment (default: MC_SSE_HEARTBEAT_S).",
    ),
]
_EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StreamMessage,
        "description": "Server-Sent Events (text/event-stream), each message an `id:`, an "
        "`event:` and one line of JSON `data:` (the JSON schema describes one message); a "
        "`: heartbeat` comment after each quiet interval. 429 when the tenant has its limit of "
        "streams open, 503 when the gateway has.",
        "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
    },
}
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
OptionalId = Annotated[str | None, Query(pattern=ID_PATTERN)]
OptionalAgentId = Annotated[str | None, Query(pattern=AGENT_ID_PATTERN)]
OptionalPolicyId = Annotated[str | None, Query(pattern=POLICY_ID_PATTERN)]
StorePosition = Annotated[int | None, Query(ge=1, le=2**63 - 1)]
RunStep = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_STEP_INDEX,
        description="Replay to the end of this step: after its record and everything of it "
        "(admission, cost, a denial's stop and incident) stored before the next step began; 0 is "
        "the run before its first step. Not with at_position or at_version.",
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "Missing, invalid, expired or revoked API key or token, or a disabled user.",
    },
    403: {
        "model": ErrorResponse,
        "description": "The caller's role or key scope does not allow this route, or the tenant "
        "named in X-Tenant-Id is not one of the caller's.",
    },
    404: {"model": ErrorResponse, "description": "Not found (or not visible to this tenant)."},
    409: {"model": ErrorResponse, "description": "Conflicts with the current state."},
    413: {"model": ErrorResponse, "description": "Request body larger than 10 MB."},
    422: {
        "model": ErrorResponse,
        "description": "Invalid request: a path, query or body value out of its limits, or a body "
        "that is not JSON (malformed, not UTF-8, nested too deeply); the message names the "
        "fields.",
    },
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


# OpenAPI links: how an answer's ids feed the next operations (a run started → admit, record,
# finish, read it; an incident listed → read, acknowledge, resolve it). Clients and stateful API
# testing follow them. Operation ids are the route functions' names.
_RUN_READS = ("get_run", "get_trace", "replay_run", "export_run")
_RUN_WRITES = ("admit", "record_step", "finish_run")
_INCIDENT_OPS = ("get_incident", "acknowledge_incident", "resolve_incident")


def _links(status: int, param: str, source: str, *operations: str) -> dict[int | str, Any]:
    """``responses`` entry: the ``status`` answer's links to ``operations``, passing ``source``
    (a runtime expression) as their ``param``."""
    links = {op: {"operationId": op, "parameters": {param: source}} for op in operations}
    return {status: {"links": links}}


def _operation_id(route: APIRoute) -> str:
    return route.name


def json_response(value: Any, status: int = 200) -> Response:
    """``value`` encoded with orjson, as an ``application/json`` answer."""
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def _json_body(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"result": value}


TenantHeader = Annotated[
    str | None,
    Header(
        alias=TENANT_HEADER,
        description="The tenant to act in, for a person holding roles in several.",
    ),
]


class Requires:
    """A route's caller dependency: authenticates the request and checks ``permission``.

    Every ``/v1`` route has exactly one (a test holds to it, and ``docs/rbac.md`` is generated
    from them): 401 without valid credentials, 403 naming the missing role or scope.
    """

    def __init__(
        self,
        permission: Permission,
        rpc: Callable[[], RpcClient],
        auth: Callable[[], Authenticator],
    ) -> None:
        self.permission = permission
        self._rpc = rpc
        self._auth = auth

    async def __call__(
        self,
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
        tenant: TenantHeader = None,
    ) -> Caller:
        token = bearer.credentials if bearer is not None else api_key
        if not token:
            raise errors.Unauthorized(
                "missing credentials: send 'Authorization: Bearer <API key or token>' or "
                "'X-API-Key: <key>'"
            )
        principal = await self._auth().authenticate(token, tenant)
        authorize(principal, self.permission)
        headers = request.state.rpc_headers
        if principal.human:
            headers = {**headers, "Mc-Actor": principal.actor}
        return Caller(principal, self._rpc(), headers)


class Public:
    """The dependency of the routes anyone may call (signing in, the signing keys)."""

    permission = Permission.PUBLIC

    async def __call__(self) -> None:
        return None


def build_router(rpc: Callable[[], RpcClient], auth: Callable[[], Authenticator]) -> APIRouter:
    """The API routes; ``rpc`` and ``auth`` give the started service's clients per request."""

    Me = Annotated[Caller, Depends(Requires(Permission.SELF, rpc, auth))]
    Read = Annotated[Caller, Depends(Requires(Permission.READ, rpc, auth))]
    Admit = Annotated[Caller, Depends(Requires(Permission.ADMIT, rpc, auth))]
    Ingest = Annotated[Caller, Depends(Requires(Permission.INGEST, rpc, auth))]
    Incidents = Annotated[Caller, Depends(Requires(Permission.INCIDENTS, rpc, auth))]
    Configure = Annotated[Caller, Depends(Requires(Permission.CONFIGURE, rpc, auth))]
    Operate = Annotated[Caller, Depends(Requires(Permission.OPERATE, rpc, auth))]
    Workflows = Annotated[Caller, Depends(Requires(Permission.WORKFLOWS, rpc, auth))]
    Execute = Annotated[Caller, Depends(Requires(Permission.EXECUTE, rpc, auth))]
    Work = Annotated[Caller, Depends(Requires(Permission.WORK, rpc, auth))]
    Approve = Annotated[Caller, Depends(Requires(Permission.APPROVE, rpc, auth))]
    Govern = Annotated[Caller, Depends(Requires(Permission.GOVERN, rpc, auth))]
    Review = Annotated[Caller, Depends(Requires(Permission.REVIEW, rpc, auth))]
    Anyone = Annotated[None, Depends(Public())]
    router = APIRouter(
        prefix="/v1",
        route_class=GatewayRoute,
        responses=_ERRORS,
        generate_unique_id_function=_operation_id,
    )

    # -- people ------------------------------------------------------------------------------------

    @router.post("/auth/token", response_model=TokenResponse, tags=["auth"])
    async def issue_token(body: TokenRequest, _: Anyone) -> Any:
        """Sign in with a user name and password (users of `mctl user create`) for a short-lived
        bearer token; send it as `Authorization: Bearer <token>`."""
        token = await auth().issue_token(body.username, body.password.get_secret_value())
        return json_response(token)

    @router.get("/auth/whoami", response_model=WhoAmIResponse, tags=["auth"])
    async def who_am_i(call: Me) -> Any:
        """Who the credentials name: user or API key, the tenant, and the roles or scopes held."""
        return json_response(whoami(call.principal))

    # -- runs and steps ----------------------------------------------------------------------------

    @router.post(
        "/runs",
        status_code=201,
        response_model=RunStartedResponse,
        tags=["runs"],
        responses=_links(201, "run_id", "$response.body#/run_id", *_RUN_WRITES, *_RUN_READS),
    )
    async def start_run(body: StartRunRequest, call: Ingest) -> Any:
        """Start a run of an agent."""
        payload = body.model_dump(mode="json", exclude_none=True)
        return await call.answer("workflow", "start_run", payload, status=201)

    @router.post(
        "/runs/{run_id}/admissions",
        response_model=AdmissionResponse,
        tags=["runs"],
        responses=_links(200, "run_id", "$request.path.run_id", "record_step", "get_trace"),
    )
    async def admit(run_id: RunIdPath, body: AdmissionRequest, call: Admit) -> Any:
        """Ask, before running a step, whether it may run. ``deny`` means: do not run it."""
        return await call.answer(
            "admission", "admit", {"run_id": run_id, **body.model_dump(mode="json")}
        )

    @router.post(
        "/runs/{run_id}/steps",
        status_code=201,
        response_model=StepsRecordedResponse,
        tags=["runs"],
        responses=_links(201, "run_id", "$request.path.run_id", *_RUN_WRITES, *_RUN_READS),
    )
    async def record_step(run_id: RunIdPath, body: StepFields, call: Ingest) -> Any:
        """Record the outcome of one step of a run."""
        item = {"run_id": run_id, **body.model_dump(mode="json")}
        return await call.answer("workflow", "record_steps", {"items": [item]}, status=201)

    @router.post(
        "/steps:batch", status_code=201, response_model=StepsRecordedResponse, tags=["runs"]
    )
    async def record_steps_batch(body: StepBatchRequest, call: Ingest) -> Any:
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

    @router.post(
        "/runs/{run_id}/finish",
        response_model=RunFinishedResponse,
        tags=["runs"],
        responses=_links(200, "run_id", "$response.body#/run_id", "admit", *_RUN_READS),
    )
    async def finish_run(run_id: RunIdPath, body: FinishRunRequest, call: Ingest) -> Any:
        """End a run as ``completed`` or ``failed``."""
        return await call.answer("workflow", "finish_run", {"run_id": run_id, **body.model_dump()})

    @router.post(
        "/runs/{run_id}/steps/{step_index}/usage",
        response_model=UsageVerdict,
        tags=["runs"],
    )
    async def report_usage(
        run_id: RunIdPath, step_index: StepIndexPath, body: UsageReport, call: Ingest
    ) -> Any:
        """Report the usage so far of call ``step_index``, still running (cumulative counts).

        Viewers of the run's and its execution's event streams see it at once. The answer says
        whether to stop: ``abort`` is true when the run has ended (timed out, aborted, stopped)
        or when a budget cannot take what the call has cost so far, which stops the step
        (``execution.step_stopped``). The call's final usage is still recorded as its step.
        """
        payload = {"run_id": run_id, "step_index": step_index, **body.model_dump(mode="json")}
        return await call.answer("workflow", "report_usage", payload)

    @router.get("/runs/{run_id}/events", tags=["runs"], responses=_EVENT_STREAM)
    async def run_events(
        run_id: RunIdPath,
        request: Request,
        call: Read,
        last_event_id: LastEventId = None,
        heartbeat_s: HeartbeatS = None,
    ) -> Response:
        """The run's events and live usage as Server-Sent Events, until it ends (see
        docs/workflows.md, "Live tokens"); resumable with ``Last-Event-ID``."""
        target = Target(call.principal.tenant_id, "run", run_id)

        async def load() -> dict[str, Any]:
            state: dict[str, Any] = await call("workflow", "get_run", {"run_id": run_id})
            return state

        return await open_stream(request, target, load, last_event_id, heartbeat_s)

    @router.get("/live", tags=["runs"], responses=_EVENT_STREAM)
    async def live_events(
        request: Request,
        call: Read,
        last_event_id: LastEventId = None,
        heartbeat_s: HeartbeatS = None,
    ) -> Response:
        """Every durable event of the tenant as Server-Sent Events (``event:`` its type,
        ``data:`` its envelope), first ``event: snapshot`` with the running runs (``{"runs":
        [...]}``, as ``GET /v1/runs?status=live`` lists them); resumable with
        ``Last-Event-ID``."""
        tenant = call.principal.tenant_id
        target = Target(tenant, "tenant", tenant)

        async def load() -> dict[str, Any]:
            running = await call("audit", "runs", {"status": "live", "limit": LIVE_SNAPSHOT_RUNS})
            return {"runs": running.get("runs", [])}

        return await open_stream(request, target, load, last_event_id, heartbeat_s)

    @router.get(
        "/runs",
        response_model=RunList,
        tags=["runs"],
        responses=_links(200, "run_id", "$response.body#/runs/0/run_id", *_RUN_READS),
    )
    async def list_runs(
        call: Read,
        status: RunStatusFilter | None = None,
        agent_id: OptionalAgentId = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Any:
        """Runs of the tenant, newest first; ``status=live`` means running."""
        query = {"status": status, "agent_id": agent_id, "limit": limit, "offset": offset}
        return await call.answer("audit", "runs", _present(query))

    @router.get("/runs/{run_id}", response_model=Run, tags=["runs"])
    async def get_run(run_id: RunIdPath, call: Read) -> Any:
        """One run: status, steps, tokens, cost, and where it stopped."""
        return await call.answer("audit", "run", {"run_id": run_id})

    @router.get("/runs/{run_id}/trace", response_model=TraceResponse, tags=["runs"])
    async def get_trace(run_id: RunIdPath, call: Read) -> Any:
        """The run's steps and decisions in order, with its inflection point."""
        return await call.answer("audit", "trace", {"run_id": run_id})

    @router.get("/runs/{run_id}/replay", response_model=ReplayResponse, tags=["runs"])
    async def replay_run(
        run_id: RunIdPath,
        call: Read,
        at_position: StorePosition = None,
        at_version: StorePosition = None,
        at_step: RunStep = None,
    ) -> Any:
        """The run as it stood at a store position, a version of its run stream, or the end of
        one of its steps (``at_step``, not with the others), rebuilt from the log; with how
        many events the run's stream holds (``events_total``)."""
        query = {
            "run_id": run_id,
            "at_position": at_position,
            "at_version": at_version,
            "at_step": at_step,
        }
        return await call.answer("audit", "replay", _present(query))

    @router.get(
        "/runs/{run_id}/export",
        tags=["runs"],
        responses={
            200: {
                "model": TraceResponse,
                "description": "The run's audit record as a file: the trace as JSON, or its "
                "steps as CSV.",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            }
        },
    )
    async def export_run(run_id: RunIdPath, call: Read, format: ExportFormat = "json") -> Response:
        """The run's complete audit record (events, decisions, costs) as JSON or CSV."""
        result = await call(
            "audit", "export", {"run_id": run_id, "format": format}, timeout=EXPORT_TIMEOUT_S
        )
        return export_response(run_id, format, result)

    # -- incidents ---------------------------------------------------------------------------------

    @router.get(
        "/incidents",
        response_model=IncidentList,
        tags=["incidents"],
        responses=_links(
            200, "incident_id", "$response.body#/incidents/0/incident_id", *_INCIDENT_OPS
        ),
    )
    async def list_incidents(
        call: Read,
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

    @router.get(
        "/incidents/{incident_id}",
        response_model=Incident,
        tags=["incidents"],
        responses=_links(200, "run_id", "$response.body#/run_id", "get_run", "get_trace"),
    )
    async def get_incident(incident_id: IncidentIdPath, call: Read) -> Any:
        """One incident with its history."""
        return await call.answer("audit", "incident", {"incident_id": str(incident_id)})

    @router.post(
        "/incidents/{incident_id}/acknowledge",
        response_model=Incident,
        tags=["incidents"],
        responses=_links(
            200, "incident_id", "$request.path.incident_id", "get_incident", "resolve_incident"
        ),
    )
    async def acknowledge_incident(
        incident_id: IncidentIdPath,
        call: Incidents,
        body: Annotated[AcknowledgeRequest | None, Body()] = None,
    ) -> Any:
        """Take ownership of an incident (the body, and ``by`` in it, may be left out)."""
        by = body.by if body is not None else None
        payload = {"incident_id": str(incident_id), "by": by or call.actor}
        return await call.answer("incident", "acknowledge", payload)

    @router.post(
        "/incidents/{incident_id}/resolve",
        response_model=Incident,
        tags=["incidents"],
        responses=_links(200, "incident_id", "$request.path.incident_id", "get_incident"),
    )
    async def resolve_incident(
        incident_id: IncidentIdPath, body: ResolveRequest, call: Incidents
    ) -> Any:
        """Close an incident, recording the resolution."""
        payload = {
            "incident_id": str(incident_id),
            "by": body.by or call.actor,
            "resolution": body.resolution,
        }
        return await call.answer("incident", "resolve", payload)

    # -- policies, costs, prices -------------------------------------------------------------------

    @router.get("/policies", response_model=PoliciesResponse, tags=["policies"])
    async def list_policies(call: Read) -> Any:
        """The active bundle's policies, with how many incidents each has caused; what decides
        in each environment (the tenant's own bundle or the default one) and the tenant's
        policy settings."""
        listing = await call("audit", "policies")
        status = await call("admission", "status")
        return json_response({**listing, **status})

    # -- policy bundles, signing keys and settings (docs/policies.md) ------------------------------

    @router.post(
        "/policy-bundles",
        response_model=BundleStored,
        status_code=201,
        tags=["policies"],
        openapi_extra=BUNDLE_BODY,
    )
    async def upload_policy_bundle(
        request: Request, call: Configure, environment: EnvironmentQuery = "production"
    ) -> Response:
        """Upload a signed bundle (tar.gz): verified, compiled and tested, then stored by its
        digest. It decides nothing until activated by that digest. 201 when new, 200 when the
        same archive was uploaded before."""
        payload = {
            "environment": environment,
            "archive_b64": await read_bundle(request),
            "actor": call.actor,
        }
        # Compiling the bundle and running its tests takes seconds, not milliseconds.
        result = await call("admission", "upload_bundle", payload, timeout=UPLOAD_TIMEOUT_S)
        return json_response(result, 201 if result.get("created") else 200)

    @router.get("/policy-bundles", response_model=BundleListing, tags=["policies"])
    async def list_policy_bundles(call: Read, environment: EnvironmentQuery = "production") -> Any:
        """The tenant's uploaded bundles of one environment and which one is active."""
        return await call.answer("admission", "list_bundles", {"environment": environment})

    @router.post(
        "/policy-bundles/{digest}:activate", response_model=BundleStored, tags=["policies"]
    )
    async def activate_policy_bundle(
        digest: DigestPath,
        call: Configure,
        environment: EnvironmentQuery = "production",
        body: Annotated[ActivateIn | None, Body()] = None,
    ) -> Any:
        """Activate an uploaded bundle, named by its digest, in one environment. It is verified
        again; every replica of policy-admission loads it without a restart. It first decides
        for a canary share of runs (10 % unless ``canary`` says otherwise), judged against the
        previous bundle; ``immediate`` switches every run at once."""
        return await _activate_bundle(call, environment, digest, body)

    @router.post("/policy-bundles:activate", response_model=BundleStored, tags=["policies"])
    async def activate_pinned_policy_bundle(
        call: Configure,
        environment: EnvironmentQuery = "production",
        digest: OptionalDigest = None,
        body: Annotated[ActivateIn | None, Body()] = None,
    ) -> Any:
        """Activate (reload) by ``?digest=``; without a digest the reload is refused
        (``bundle_reload_unpinned``): nothing is ever activated by name or by "latest"."""
        return await _activate_bundle(call, environment, digest, body)

    @router.get("/policy-reloads", response_model=ReloadListing, tags=["policies"])
    async def list_policy_reloads(call: Read, environment: OptionalEnvironmentQuery = None) -> Any:
        """Every bundle reload of the tenant, newest first, each with its impact report."""
        return await call.answer(
            "admission", "list_reloads", _present({"environment": environment})
        )

    @router.get("/policy-reloads/{reload_id}", response_model=ReloadReport, tags=["policies"])
    async def get_policy_reload(reload_id: ReloadIdPath, call: Read) -> Any:
        """One reload's impact report: decisions, deny rate, errors and latency of the canary
        against the stable bundle (live while the canary runs) and the outcome."""
        return await call.answer("admission", "get_reload", {"reload_id": reload_id})

    @router.post(
        "/policy-reloads/{reload_id}:promote", response_model=ReloadReport, tags=["policies"]
    )
    async def promote_policy_reload(
        reload_id: ReloadIdPath, call: Configure, body: Annotated[EndCanaryIn | None, Body()] = None
    ) -> Any:
        """End a canary now: its bundle decides for every run."""
        return await _end_canary(call, reload_id, "promoted", body)

    @router.post(
        "/policy-reloads/{reload_id}:abort", response_model=ReloadReport, tags=["policies"]
    )
    async def abort_policy_reload(
        reload_id: ReloadIdPath, call: Configure, body: Annotated[EndCanaryIn | None, Body()] = None
    ) -> Any:
        """Roll a canary back now: the bundle it was tried against decides for every run."""
        return await _end_canary(call, reload_id, "rolled_back", body)

    @router.post("/policy-chaos", response_model=ChaosResult, tags=["policies"])
    async def run_policy_chaos(body: ChaosIn, call: Configure) -> Any:
        """Run a chaos case beside the tenant's bundle, in sandbox only: a reload with one bad
        file, conflicting policies, or 10,000 exceptions expiring in one second. The engine must
        keep deciding with its last good bundle; each run is a ``policy.chaos_ran`` event."""
        payload = {"case": body.case, "environment": body.environment, "actor": call.actor}
        result = await call("admission", "run_chaos", payload, timeout=UPLOAD_TIMEOUT_S)
        return json_response(result)

    @router.post(
        "/policy-webhooks", response_model=WebhookCreated, status_code=201, tags=["policies"]
    )
    async def create_policy_webhook(body: WebhookIn, call: Govern) -> Any:
        """Subscribe a URL to every reload outcome (the impact report, signed with HMAC-SHA256).
        The answer shows the signing secret; it is never shown again."""
        payload = {"url": body.url, "actor": call.actor}
        return await call.answer("admission", "create_webhook", payload, status=201)

    @router.get("/policy-webhooks", response_model=WebhookListing, tags=["policies"])
    async def list_policy_webhooks(call: Read) -> Any:
        """The tenant's webhook subscriptions and their deliveries (never their secrets)."""
        return await call.answer("admission", "list_webhooks")

    @router.delete(
        "/policy-webhooks/{webhook_id}", response_model=WebhookDeleted, tags=["policies"]
    )
    async def delete_policy_webhook(webhook_id: WebhookIdPath, call: Govern) -> Any:
        """Unsubscribe; its undelivered reports are dropped."""
        return await call.answer("admission", "delete_webhook", {"webhook_id": webhook_id})

    @router.get("/policy-signing-keys", response_model=SigningKeyListing, tags=["policies"])
    async def list_policy_signing_keys(call: Read) -> Any:
        """The tenant's bundle signing keys, active and retired."""
        return await call.answer("admission", "list_signing_keys")

    @router.put(
        "/policy-signing-keys/{key_id}", response_model=SigningKeyListing, tags=["policies"]
    )
    async def put_policy_signing_key(key_id: KeyIdPath, body: SigningKeyIn, call: Govern) -> Any:
        """Register an ed25519 public key that may sign the tenant's bundles (the JWT's
        ``kid``). The same key again changes nothing; another key under a used id is 409."""
        payload = {"key_id": key_id, "public_key": body.public_key, "actor": call.actor}
        return await call.answer("admission", "put_signing_key", payload)

    @router.post(
        "/policy-signing-keys/{key_id}:retire",
        response_model=SigningKeyListing,
        tags=["policies"],
    )
    async def retire_policy_signing_key(
        key_id: KeyIdPath, call: Govern, body: Annotated[RetireKeyIn | None, Body()] = None
    ) -> Any:
        """Retire a signing key: bundles it signed can no longer be uploaded or activated
        (the active bundle keeps deciding). Its id is never reused."""
        payload = {
            "key_id": key_id,
            "reason": body.reason if body is not None else None,
            "actor": call.actor,
        }
        return await call.answer("admission", "retire_signing_key", payload)

    @router.get("/policy-settings", response_model=PolicySettingsView, tags=["policies"])
    async def get_policy_settings(call: Read) -> Any:
        """The tenant's limits and allowlists and their version."""
        return await call.answer("admission", "get_settings")

    @router.put("/policy-settings", response_model=PolicySettingsView, tags=["policies"])
    async def put_policy_settings(
        body: PolicySettingsIn,
        call: Configure,
        if_match: Annotated[
            str | None,
            Header(description="The settings version this replaces (or send `version`)."),
        ] = None,
    ) -> Any:
        """Replace the tenant's limits and allowlists; admission applies them at once, without
        a restart. With ``version`` (or ``If-Match``) a concurrent change is a 409."""
        payload = {**settings_payload(body, if_match), "actor": call.actor}
        return await call.answer("admission", "put_settings", payload)

    @router.post(
        "/policy-exceptions",
        response_model=PolicyExceptionView,
        status_code=201,
        tags=["policies"],
    )
    async def grant_policy_exception(body: PolicyExceptionIn, call: Govern) -> Any:
        """Grant a time-bound exception: denials of ``policy_id`` for the agent (or run) are
        admitted as warnings, naming the exception, until ``expires_at``. People only (admin);
        the granting admin is recorded. Name ``exception_id`` to make a retry safe."""
        payload = {
            **body.model_dump(mode="json"),
            "exception_id": body.exception_id or str(new_uuid7()),
            "actor": call.actor,
        }
        return await call.answer("admission", "grant_exception", payload, status=201)

    @router.get("/policy-exceptions", response_model=PolicyExceptionListing, tags=["policies"])
    async def list_policy_exceptions(call: Read, status: ExceptionStatusQuery = None) -> Any:
        """The tenant's policy exceptions (of one status) and the burndown: how many open
        exceptions expire on each day."""
        return await call.answer("admission", "list_exceptions", _present({"status": status}))

    @router.post(
        "/policy-exceptions/{exception_id}:revoke",
        response_model=PolicyExceptionView,
        tags=["policies"],
    )
    async def revoke_policy_exception(
        exception_id: ExceptionIdPath,
        call: Govern,
        body: Annotated[RevokeExceptionIn | None, Body()] = None,
    ) -> Any:
        """Withdraw an exception before its expiry: no decision applies it from now on."""
        payload = {
            "exception_id": exception_id,
            "reason": body.reason if body is not None else None,
            "actor": call.actor,
        }
        return await call.answer("admission", "revoke_exception", payload)

    @router.get("/policy-freeze", response_model=PolicyFreezeView, tags=["policies"])
    async def policy_freeze(call: Read) -> Any:
        """Whether promotions into each environment are frozen, by which open incidents, and
        the overrides so far."""
        return await call.answer("admission", "freeze_status")

    @router.post(
        "/policy-freeze/{environment}:override",
        response_model=EnvironmentFreezeView,
        tags=["policies"],
    )
    async def override_policy_freeze(
        environment: FreezeEnvironmentPath, body: FreezeOverrideIn, call: Govern
    ) -> Any:
        """Let promotions into ``environment`` go ahead despite the incidents open now; you and
        your reason are recorded. An incident opened later freezes again. 409 when nothing
        freezes it."""
        payload = {"environment": environment, "reason": body.reason, "actor": call.actor}
        return await call.answer("admission", "override_freeze", payload)

    @router.get("/policy-drift", response_model=PolicyDriftView, tags=["policies"])
    async def policy_drift(call: Read) -> Any:
        """Sandbox and production compared now, dimension by dimension, and the drift on
        record; unacknowledged drift blocks promotions."""
        return await call.answer("admission", "drift_status")

    @router.post("/policy-drift:check", response_model=PolicyDriftView, tags=["policies"])
    async def check_policy_drift(call: Govern) -> Any:
        """Compare the environments and record the result now, not at the next period."""
        return await call.answer("admission", "check_drift", {"actor": call.actor})

    @router.post("/policy-drift:acknowledge", response_model=PolicyDriftView, tags=["policies"])
    async def acknowledge_policy_drift(body: DriftAcknowledgeIn, call: Govern) -> Any:
        """Accept the drift on record with a reason; you and the reason are recorded. It stops
        blocking promotions until the drift changes. 409 when there is none."""
        payload = {**body.model_dump(exclude_none=True), "actor": call.actor}
        return await call.answer("admission", "acknowledge_drift", payload)

    @router.post("/policy-drift:align", response_model=PolicyDriftView, tags=["policies"])
    async def align_policy_drift(body: DriftAlignIn, call: Govern) -> Any:
        """Make the other environment decide with ``source``'s bundle (uploaded there and
        activated, with every check an activation makes), then compare again."""
        payload = {"source": body.source, "actor": call.actor}
        # Uploading the bundle to the other environment runs its tests again: seconds.
        result = await call("admission", "align_drift", payload, timeout=UPLOAD_TIMEOUT_S)
        return json_response(result)

    # -- diffs of two bundles or two agent specs (docs/policies.md, "Diffs") ---------------------

    @router.post("/diffs", response_model=DiffPage, tags=["policies"])
    async def create_diff(body: DiffIn, call: Read) -> Any:
        """Compare two of the tenant's bundles (by digest) or two agent specs: the diff's
        ``diff_hash``, its summary and the first page of rows, each marked locked or enforced
        with its policy notes. Page on with ``GET /v1/diffs/{diff_hash}``."""
        payload = {**diff_payload(body), "actor": call.actor}
        result = await call("admission", "create_diff", payload, timeout=DIFF_TIMEOUT_S)
        return json_response(result)

    @router.get("/diffs", response_model=DiffListing, tags=["policies"])
    async def list_diffs(call: Read, cursor: CursorQuery = None, limit: ListLimitQuery = 50) -> Any:
        """The tenant's diffs without their rows, the most recently asked for first, a page at
        a time (``cursor``: the previous page's ``next_cursor``): what each compared, its
        counts, and who asked for it."""
        payload = _present({"cursor": cursor, "limit": limit})
        return await call.answer("admission", "list_diffs", payload)

    @router.get("/diffs/{diff_hash}", response_model=DiffPage, tags=["policies"])
    async def get_diff(
        diff_hash: DiffHashPath,
        call: Read,
        cursor: DiffCursorQuery = None,
        limit: LimitQuery = 100,
        view: ViewQuery = "structured",
    ) -> Any:
        """A page of a diff's rows, in a stable order, from ``cursor`` (the previous page's
        ``next_cursor``), as ``structured`` or ``side-by-side`` rows."""
        payload = _present({"diff_hash": diff_hash, "cursor": cursor, "limit": limit, "view": view})
        result = await call("admission", "get_diff", payload, timeout=DIFF_TIMEOUT_S)
        return json_response(result)

    @router.post(
        "/diffs/{diff_hash}/acknowledge", response_model=DiffAcknowledgements, tags=["policies"]
    )
    async def acknowledge_diff(diff_hash: DiffHashPath, call: Review) -> Any:
        """Record that you viewed the diff (``policy.diff_acknowledged``, once per person);
        a promotion may require it. People only."""
        payload = {"diff_hash": diff_hash, "actor": call.actor}
        return await call.answer("admission", "acknowledge_diff", payload)

    @router.post(
        "/policy-simulations",
        response_model=PolicySimulationView,
        status_code=202,
        tags=["policies"],
    )
    async def start_policy_simulation(body: PolicySimulationIn, call: Configure) -> Any:
        """Simulate an uploaded bundle on the decisions recorded in a time window: which would
        flip, which runs would have stopped and at which step, and the cost that would have
        prevented, per policy. Runs as a job: poll ``GET /v1/policy-simulations/{id}``."""
        payload = {**body.model_dump(mode="json", exclude_none=True), "actor": call.actor}
        return await call.answer("admission", "start_simulation", payload, status=202)

    @router.get("/policy-simulations", response_model=PolicySimulationListing, tags=["policies"])
    async def list_policy_simulations(
        call: Read,
        status: SimulationStatus | None = None,
        cursor: CursorQuery = None,
        limit: ListLimitQuery = 50,
    ) -> Any:
        """The tenant's simulations without their reports, newest first, a page at a time
        (``cursor``: the previous page's ``next_cursor``), of one ``status`` or all; a done
        one's totals as ``summary``."""
        payload = _present({"status": status, "cursor": cursor, "limit": limit})
        return await call.answer("admission", "list_simulations", payload)

    @router.get(
        "/policy-simulations/{simulation_id}",
        response_model=PolicySimulationView,
        tags=["policies"],
        responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
    )
    async def get_policy_simulation(
        simulation_id: SimulationIdPath,
        call: Read,
        request: Request,
        format: SimulationFormat = None,
    ) -> Any:
        """A simulation's status and progress, and its report once done; as CSV (one row per
        policy) with ``?format=csv`` or ``Accept: text/csv``."""
        csv = format == "csv" or (
            format is None and "text/csv" in request.headers.get("accept", "")
        )
        fmt = "csv" if csv else "json"
        view = await call(
            "admission", "get_simulation", {"simulation_id": simulation_id, "format": fmt}
        )
        if not csv:
            return json_response(view)
        if view.get("csv") is None:
            raise errors.Conflict(
                f"simulation_not_done: the simulation is {view.get('status')}; its CSV comes "
                "with its report"
            )
        return Response(
            view["csv"],
            media_type=CSV_MEDIA_TYPE,
            headers={
                "Content-Disposition": f'attachment; filename="simulation-{simulation_id}.csv"'
            },
        )

    @router.post(
        "/policy-hooks/{hook}/evaluate", response_model=PolicyHookDecision, tags=["policies"]
    )
    async def evaluate_policy_hook(hook: HookPath, body: PolicyHookIn, call: Admit) -> Any:
        """A lifecycle hook's decision: allow, warn or deny, with the violations, warnings,
        locked fields, proposed mutations and runbook links of the tenant's bundle. Recorded
        as ``policy.hook_evaluated`` (``before_execute`` only evaluates: the admission itself
        is ``POST /v1/runs/{run_id}/admissions``)."""
        return await call.answer(
            "admission", "evaluate_hook", hook_payload(hook, body, call.principal)
        )

    @router.get("/costs", response_model=CostsResponse, tags=["costs"])
    async def costs(
        call: Read,
        group_by: CostGrouping = "run",
        run_id: OptionalId = None,
        execution_id: OptionalId = None,
    ) -> Any:
        """Cost of the tenant's runs per usage component, by run, agent, model, workflow, day or
        step (of a workflow execution); of one run (``run_id``) or of one execution's step
        attempts (``execution_id``)."""
        query = {"group_by": group_by, "run_id": run_id, "execution_id": execution_id}
        return await call.answer("audit", "costs", _present(query))

    @router.get("/prices", response_model=PriceListing, tags=["costs"])
    async def prices(call: Read) -> Any:
        """The tenant's price table (custom prices over the defaults) and its version."""
        return await call.answer("cost", "prices")

    @router.put("/prices", response_model=PricesPublishedResponse, tags=["costs"])
    async def set_prices(body: SetPricesRequest, call: Configure) -> Any:
        """Publish a new version of the tenant's custom price table."""
        payload = {**body.model_dump(mode="json", exclude_none=True), "actor": call.actor}
        return await call.answer("cost", "set_prices", payload)

    # -- admin -------------------------------------------------------------------------------------

    @router.post(
        "/admin/rebuild-projections",
        status_code=202,
        response_model=RebuildResponse,
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
        call: Operate,
        admin_token: Annotated[
            str | None,
            Header(
                alias=ADMIN_HEADER,
                description="The operator token the gateway was started with (MC_ADMIN_TOKEN).",
            ),
        ] = None,
    ) -> Any:
        """Drop and rebuild every query projection from the event store (operators only).

        The projections of all tenants share one database, so besides the `operate` permission
        (role admin, or an API key with the `ingest` scope) this needs the operator token: set
        `MC_ADMIN_TOKEN` in the gateway's environment and send it in the `X-Admin-Token` header.
        Without a configured token the route answers 403 ("admin operations are disabled").
        While the rebuild runs, queries of every tenant answer 503 `unavailable` ("projections
        are being rebuilt, retry shortly") rather than partial data.
        """
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None:
            raise errors.TransientError("the gateway is not started")
        configured = ctx.settings.admin_token
        require_admin_token(configured.get_secret_value() if configured else None, admin_token)
        result = await call("audit", "rebuild", timeout=REBUILD_TIMEOUT_S)
        return json_response(_json_body(result), 202)

    # -- agents, workflows and executions ---------------------------------------------------------

    # Replay and full exports of runs and executions, export jobs (audit-replay, docs/audit.md).
    export_routes(
        router, Requires(Permission.READ, rpc, auth), Requires(Permission.EXPORT, rpc, auth)
    )
    # The agent registry (policy-admission, docs/agents.md).
    agent_routes(
        router,
        Requires(Permission.READ, rpc, auth),
        Requires(Permission.WORKFLOWS, rpc, auth),
        Requires(Permission.GOVERN, rpc, auth),
    )
    # Audit search (audit-replay's search table).
    audit_search_routes(router, Requires(Permission.READ, rpc, auth))
    # The console's analytics and monthly statements (audit-replay's projections).
    insight_routes(router, Requires(Permission.READ, rpc, auth))
    # The tenant's API keys and members (the gateway's own tables).
    directory_routes(
        router, Requires(Permission.READ, rpc, auth), Requires(Permission.KEYS, rpc, auth), auth
    )
    # Signed evidence documents (audit-replay reads the event store and signs them).
    evidence_routes(
        router, Requires(Permission.EVIDENCE, rpc, auth), Requires(Permission.ATTEST, rpc, auth)
    )
    # Promotion requests (workflow-engine's approvals, policy-admission's checks).
    promotion_routes(
        router,
        Requires(Permission.READ, rpc, auth),
        Requires(Permission.WORKFLOWS, rpc, auth),
        Requires(Permission.APPROVE, rpc, auth),
    )

    @router.post(
        "/agents", response_model=AgentRegisteredResponse, status_code=201, tags=["workflows"]
    )
    async def register_agent(body: RegisterAgentRequest, call: Workflows) -> Any:
        """Register an agent in the tenant's catalogue (registering it again changes nothing)."""
        payload = body.model_dump()
        return await call.answer("workflow", "register_agent", payload, status=201)

    @router.post(
        "/agents/{agent_id}/work:take",
        response_model=WorkItem,
        tags=["workflows"],
        responses={204: {"description": "No work arrived within `wait_s`."}},
    )
    async def take_work(
        agent_id: AgentNamePath,
        request: Request,
        call: Work,
        wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 20.0,
    ) -> Response:
        """Take the agent's next dispatched step (a long poll of up to ``wait_s`` seconds).

        The item names the attempt's run: ask admission for each call, record each call and
        finish the run. An item is handed over once; a worker that loses it leaves the attempt
        to time out, and the engine dispatches the next attempt. A poll whose worker has
        disconnected takes nothing: an item fetched for it goes back to the queue.
        """
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None:
            raise errors.TransientError("the gateway is not started")
        item = await work_queues(ctx.js).take(
            call.principal.tenant_id, agent_id, wait_s, gone=request.is_disconnected
        )
        if item is None:
            return Response(status_code=204)
        return json_response(item)

    @router.get("/agents", response_model=AgentListing, tags=["workflows"])
    async def list_agents(call: Read) -> Any:
        """The tenant's registered agents."""
        return await call.answer("workflow", "list_agents")

    @router.post(
        "/workflows", response_model=WorkflowSaved, tags=["workflows"], openapi_extra=DOCUMENT_BODY
    )
    async def save_workflow(
        request: Request,
        call: Workflows,
        base_version: Annotated[int | None, Query(ge=0, le=MAX_VERSION)] = None,
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

    @router.get("/workflows", response_model=WorkflowListing, tags=["workflows"])
    async def list_workflows(call: Read) -> Any:
        """The tenant's workflows, newest version of each."""
        return await call.answer("workflow", "list_workflows")

    @router.get("/workflows/{workflow_id}", response_model=WorkflowVersion, tags=["workflows"])
    async def get_workflow(
        workflow_id: WorkflowIdPath,
        call: Read,
        version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    ) -> Any:
        """One version of a workflow (the newest by default) with its document."""
        payload: dict[str, Any] = {"workflow_id": workflow_id}
        if version is not None:
            payload["version"] = version
        return await call.answer("workflow", "get_workflow", payload)

    @router.get("/workflows/{workflow_id}/diff", response_model=WorkflowDiff, tags=["workflows"])
    async def diff_workflow(
        workflow_id: WorkflowIdPath,
        call: Read,
        from_version: Annotated[int, Query(ge=1, le=MAX_VERSION)],
        to_version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    ) -> Any:
        """Steps added and removed and each changed field between two versions."""
        payload: dict[str, Any] = {"workflow_id": workflow_id, "from_version": from_version}
        if to_version is not None:
            payload["to_version"] = to_version
        return await call.answer("workflow", "diff_workflow", payload)

    @router.post(
        "/workflows/{workflow_id}/executions",
        response_model=ExecutionView,
        status_code=201,
        tags=["workflows"],
    )
    async def start_execution(
        workflow_id: WorkflowIdPath, body: StartExecutionRequest, call: Execute
    ) -> Any:
        """Start an execution; the steps with no dependencies are dispatched at once."""
        payload = {"workflow_id": workflow_id, **body.model_dump(mode="json", exclude_none=True)}
        return await call.answer("workflow", "start_execution", payload, status=201)

    @router.get("/executions", response_model=ExecutionListing, tags=["workflows"])
    async def list_executions(
        call: Read,
        status: ExecutionStatus | None = None,
        workflow_id: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        started_after: Annotated[
            AwareDatetime | None, Query(description="Started at or after (ISO 8601, with zone).")
        ] = None,
        started_before: Annotated[
            AwareDatetime | None, Query(description="Started before (ISO 8601, with zone).")
        ] = None,
        cursor: CursorQuery = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        """The tenant's executions, newest first, a page at a time (``cursor``: the previous
        page's ``next_cursor``), by status, workflow and start time."""
        payload = _present(
            {
                "status": status,
                "workflow_id": workflow_id,
                "started_after": started_after.isoformat() if started_after else None,
                "started_before": started_before.isoformat() if started_before else None,
                "cursor": cursor,
                "limit": limit,
            }
        )
        return await call.answer("workflow", "list_executions", payload)

    @router.get("/executions/{execution_id}", response_model=ExecutionView, tags=["workflows"])
    async def get_execution(execution_id: ExecutionIdPath, call: Read) -> Any:
        """An execution: its DAG with each step's state, attempt, run and duration."""
        return await call.answer("workflow", "get_execution", {"execution_id": execution_id})

    @router.get("/executions/{execution_id}/events", tags=["workflows"], responses=_EVENT_STREAM)
    async def execution_events(
        execution_id: ExecutionIdPath,
        request: Request,
        call: Read,
        last_event_id: LastEventId = None,
        heartbeat_s: HeartbeatS = None,
    ) -> Response:
        """The execution's events, its attempts' runs' events and their live usage as
        Server-Sent Events, until it ends; resumable with ``Last-Event-ID``."""
        target = Target(call.principal.tenant_id, "execution", execution_id)

        async def load() -> dict[str, Any]:
            found: dict[str, Any] = await call(
                "workflow", "get_execution", {"execution_id": execution_id}
            )
            return found

        return await open_stream(request, target, load, last_event_id, heartbeat_s)

    @router.post(
        "/executions/{execution_id}/abort", response_model=ExecutionView, tags=["workflows"]
    )
    async def abort_execution(
        execution_id: ExecutionIdPath, body: AbortExecutionRequest, call: Execute
    ) -> Any:
        """Abort an execution: nothing more is dispatched and its running attempts' runs end."""
        payload = {"execution_id": execution_id, "reason": body.reason}
        return await call.answer("workflow", "abort_execution", payload)

    @router.post(
        "/executions/{execution_id}/steps/{step_id}/approve",
        response_model=ExecutionView,
        tags=["workflows"],
    )
    async def approve_step(
        execution_id: ExecutionIdPath, step_id: StepIdPath, body: ApprovalDecision, call: Approve
    ) -> Any:
        """Approve a step waiting for approval, as yourself; it is dispatched once enough
        distinct people with the tier's role have approved it."""
        payload = approval_payload(call.principal, execution_id, step_id, body.reason)
        return await call.answer("workflow", "approve_step", payload)

    @router.post(
        "/executions/{execution_id}/steps/{step_id}/reject",
        response_model=ExecutionView,
        tags=["workflows"],
    )
    async def reject_step(
        execution_id: ExecutionIdPath, step_id: StepIdPath, body: ApprovalDecision, call: Approve
    ) -> Any:
        """Reject a step waiting for approval: the execution fails with your name and reason."""
        payload = approval_payload(call.principal, execution_id, step_id, body.reason)
        return await call.answer("workflow", "reject_step", payload)

    @router.get("/approvals", response_model=ApprovalQueue, tags=["workflows"])
    async def approval_queue(call: Read) -> Any:
        """Steps waiting for approval, oldest first, with their age and the SLA left."""
        return await call.answer("workflow", "approval_queue")

    @router.get("/approval-rules", response_model=ApprovalRulesView, tags=["workflows"])
    async def approval_rules(call: Read) -> Any:
        """How many approvers of which role each risk tier needs, and its SLA."""
        return await call.answer("workflow", "approval_rules")

    @router.put("/approval-rules", response_model=ApprovalRulesView, tags=["workflows"])
    async def set_approval_rules(body: ApprovalRulesIn, call: Govern) -> Any:
        """Set the approval rules; executions started from now on follow them."""
        rules = body.model_dump(mode="json", exclude_none=True)
        return await call.answer("workflow", "set_approval_rules", {"rules": rules})

    # -- budgets ------------------------------------------------------------------------------

    @router.put("/budgets", response_model=BudgetSetResponse, tags=["budgets"])
    async def set_budget(body: SetBudgetRequest, call: Configure) -> Any:
        """Set a budget's cap (its id is ``scope[:subject]:window``); a new cap applies to the
        current window at once."""
        return await call.answer("workflow", "set_budget", body.model_dump(mode="json"))

    @router.get("/budgets", response_model=BudgetListing, tags=["budgets"])
    async def list_budgets(
        call: Read,
        scope: BudgetScope | None = None,
        execution_id: Annotated[
            str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
        ] = None,
    ) -> Any:
        """Each budget with its current window's spent, reserved and remaining (per-execution
        windows: those of ``execution_id``)."""
        payload = _present({"scope": scope, "execution_id": execution_id})
        return await call.answer("workflow", "list_budgets", payload)

    @router.put("/budgets/timezone", response_model=BudgetTimezoneResponse, tags=["budgets"])
    async def set_budget_timezone(body: SetBudgetTimezoneRequest, call: Configure) -> Any:
        """Set the time zone of the tenant's day and month windows (default UTC)."""
        return await call.answer("workflow", "set_budget_timezone", body.model_dump())

    return router


def build_well_known_router(auth: Callable[[], Authenticator]) -> APIRouter:
    """The routes outside ``/v1`` that other parties look for at fixed paths."""
    router = APIRouter(route_class=GatewayRoute)

    # A fixed, standard path for verifiers, like the probes: not an operation of the API.
    @router.get(JWKS_PATH, include_in_schema=False)
    async def signing_keys(_: Annotated[None, Depends(Public())]) -> Any:
        """The public keys that verify the gateway's tokens (JWKS, RFC 7517)."""
        return json_response(auth().signer.jwks())

    return router


def declared_permissions(route: APIRoute) -> list[Permission]:
    """The permissions ``route``'s dependencies declare (every API route declares one)."""
    return [
        d.call.permission
        for d in route.dependant.dependencies
        if isinstance(d.call, Requires | Public)
    ]


def permission_table(*routers: APIRouter) -> list[tuple[str, str, Permission]]:
    """(method, path, permission) of each route of ``routers``, in their order."""
    return [
        (method, route.path, permission)
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods or ())
        for permission in declared_permissions(route)
    ]


async def _activate_bundle(
    call: Caller, environment: str, digest: str | None, body: ActivateIn | None = None
) -> Response:
    payload: dict[str, Any] = {
        "environment": environment,
        "bundle_digest": digest,
        "actor": call.actor,
    }
    if body is not None:
        payload["immediate"] = body.immediate
        if body.canary is not None:
            payload["canary"] = body.canary.model_dump(mode="json")
    return await call.answer("admission", "activate_bundle", payload)


async def _end_canary(
    call: Caller, reload_id: str, outcome: str, body: EndCanaryIn | None
) -> Response:
    payload = {
        "reload_id": reload_id,
        "outcome": outcome,
        "reason": body.reason if body is not None else None,
        "actor": call.actor,
    }
    return await call.answer("admission", "end_canary", payload)


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
