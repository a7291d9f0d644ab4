"""Typed Python clients of the Mission Control API: :class:`MissionControlClient` (blocking) and
:class:`AsyncMissionControlClient` (asyncio), both on httpx.

Both clients build their requests with the same :class:`Requests` methods and read the answers
with the same :func:`read_response`; each client method is one line sending what :class:`Requests`
built. Request bodies are validated with the server's own models before they are sent, so a bad
argument fails locally with pydantic's message. Non-2xx answers raise :class:`ApiError`.

    with MissionControlClient("http://127.0.0.1:8000", api_key) as mc:
        run = mc.start_run(agent_id="code-review")
        decision = mc.admit(run.run_id, step_index=1, input_tokens=500, max_output_tokens=200)
        if decision.outcome != "deny":
            ...  # run the step
            mc.record_step(run.run_id, step_index=1, input_tokens=480, output_tokens=150)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from services.gateway.schemas import (
    AcknowledgeRequest,
    AdmissionRequest,
    AdmissionResponse,
    Estimate,
    FinishRunRequest,
    ModelPriceIn,
    ResolveRequest,
    RunFinishedResponse,
    RunStartedResponse,
    SetPricesRequest,
    StartRunRequest,
    StepBatchItem,
    StepBatchRequest,
    StepFields,
    StepsRecordedResponse,
    UsageReport,
    UsageVerdict,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT_S = 10.0
# How long an idle connection is kept for reuse. It must end before the server's keep-alive does
# (the gateway's is 60 s): at equal times the server closes the connection as the client sends on
# it, and the request fails with a ReadError it never reached the server with.
KEEPALIVE_EXPIRY_S = 15.0
LIMITS = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)


class ApiError(Exception):
    """A non-2xx answer: the HTTP status and the API's error code and message.

    ``retry_after`` is the seconds the server asked the caller to wait before retrying (its
    ``Retry-After`` header, sent with 429 ``overloaded``), or ``None``.
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ApiRequest(Generic[T]):
    """One HTTP request to send, and how to read its answer into a ``T``."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    body: BaseModel | None = None
    model: type[BaseModel] | None = None
    raw: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """Headers of this request only, on top of the client's (authentication, ``Accept``)."""

    def to_httpx(self) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request``."""
        kwargs: dict[str, Any] = {"params": {k: v for k, v in self.params.items() if v is not None}}
        headers = dict(self.headers)
        if self.body is not None:
            kwargs["content"] = self.body.model_dump_json(exclude_none=True)
            headers["Content-Type"] = "application/json"
        if headers:
            kwargs["headers"] = headers
        return {"method": self.method, "url": self.path, **kwargs}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def read_response(request: ApiRequest[T], response: httpx.Response) -> T:
    """The answer as ``T``, or :class:`ApiError` when it is not a success."""
    if response.status_code >= 400:
        code, message = "http_error", response.text[:500]
        try:
            err = response.json().get("error") or {}
            code, message = str(err.get("code", code)), str(err.get("message", message))
        except (ValueError, AttributeError):
            pass
        raise ApiError(response.status_code, code, message, _retry_after(response))
    if request.raw:
        return response.content  # type: ignore[return-value]
    data = response.json()
    if request.model is not None:
        return request.model.model_validate(data)  # type: ignore[return-value]
    return data  # type: ignore[no-any-return]


def _seg(value: str) -> str:
    return quote(value, safe="")


def _req(method: str, path: str, model: type[M], body: BaseModel | None = None) -> ApiRequest[M]:
    return ApiRequest(method, path, body=body, model=model)


def _json(
    method: str, path: str, body: BaseModel | None = None, params: dict[str, Any] | None = None
) -> ApiRequest[Any]:
    return ApiRequest(method, path, params=params or {}, body=body)


class Requests:
    """Builds the request of every endpoint; shared by the blocking and the async client."""

    @staticmethod
    def start_run(
        agent_id: str, run_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> ApiRequest[RunStartedResponse]:
        """``POST /v1/runs``."""
        body = StartRunRequest(run_id=run_id, agent_id=agent_id, labels=dict(labels or {}))
        return _req("POST", "/v1/runs", RunStartedResponse, body)

    @staticmethod
    def admit(
        run_id: str,
        step_index: int,
        *,
        kind: str = "llm_call",
        model: str | None = None,
        tool: str | None = None,
        estimate: Estimate | Mapping[str, int] | None = None,
        input_tokens: int = 0,
        max_output_tokens: int = 0,
    ) -> ApiRequest[AdmissionResponse]:
        """``POST /v1/runs/{run_id}/admissions``.

        The estimate is ``estimate`` (``{"input_tokens", "max_output_tokens"}``) when given, else
        built from ``input_tokens`` and ``max_output_tokens``.
        """
        if estimate is None:
            estimate = Estimate(input_tokens=input_tokens, max_output_tokens=max_output_tokens)
        elif not isinstance(estimate, Estimate):
            estimate = Estimate.model_validate(dict(estimate))
        body = AdmissionRequest(
            step_index=step_index, kind=kind, model=model, tool=tool, estimate=estimate
        )
        return _req("POST", f"/v1/runs/{_seg(run_id)}/admissions", AdmissionResponse, body)

    @staticmethod
    def record_step(
        run_id: str, step_index: int, **fields: Any
    ) -> ApiRequest[StepsRecordedResponse]:
        """``POST /v1/runs/{run_id}/steps``; ``fields`` as in :class:`StepFields`."""
        body = StepFields(step_index=step_index, **fields)
        return _req("POST", f"/v1/runs/{_seg(run_id)}/steps", StepsRecordedResponse, body)

    @staticmethod
    def report_usage(
        run_id: str, step_index: int, model: str | None = None, **usage: int
    ) -> ApiRequest[UsageVerdict]:
        """``POST /v1/runs/{run_id}/steps/{step_index}/usage``: the cumulative usage so far of
        a call still running; ``usage`` as in :class:`UsageReport` (``input_tokens``, ...)."""
        body = UsageReport(model=model, **usage)
        path = f"/v1/runs/{_seg(run_id)}/steps/{step_index}/usage"
        return _req("POST", path, UsageVerdict, body)

    @staticmethod
    def record_steps_batch(
        items: Iterable[StepBatchItem | Mapping[str, Any]],
    ) -> ApiRequest[StepsRecordedResponse]:
        """``POST /v1/steps:batch``."""
        body = StepBatchRequest(
            items=[i if isinstance(i, StepBatchItem) else StepBatchItem(**i) for i in items]
        )
        return _req("POST", "/v1/steps:batch", StepsRecordedResponse, body)

    @staticmethod
    def finish_run(
        run_id: str, status: str = "completed", reason: str | None = None
    ) -> ApiRequest[RunFinishedResponse]:
        """``POST /v1/runs/{run_id}/finish``."""
        body = FinishRunRequest.model_validate({"status": status, "reason": reason})
        return _req("POST", f"/v1/runs/{_seg(run_id)}/finish", RunFinishedResponse, body)

    @staticmethod
    def runs(
        status: str | None = None, agent_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> ApiRequest[Any]:
        """``GET /v1/runs``."""
        params = {"status": status, "agent_id": agent_id, "limit": limit, "offset": offset}
        return _json("GET", "/v1/runs", params=params)

    @staticmethod
    def run(run_id: str) -> ApiRequest[Any]:
        """``GET /v1/runs/{run_id}``."""
        return _json("GET", f"/v1/runs/{_seg(run_id)}")

    @staticmethod
    def trace(run_id: str) -> ApiRequest[Any]:
        """``GET /v1/runs/{run_id}/trace``."""
        return _json("GET", f"/v1/runs/{_seg(run_id)}/trace")

    @staticmethod
    def replay(
        run_id: str,
        at_position: int | None = None,
        at_version: int | None = None,
        at_step: int | None = None,
    ) -> ApiRequest[Any]:
        """``GET /v1/runs/{run_id}/replay``."""
        params = {"at_position": at_position, "at_version": at_version, "at_step": at_step}
        return _json("GET", f"/v1/runs/{_seg(run_id)}/replay", params=params)

    @staticmethod
    def export(run_id: str, format: str = "json") -> ApiRequest[bytes]:
        """``GET /v1/runs/{run_id}/export``: the file's bytes."""
        return ApiRequest(
            "GET", f"/v1/runs/{_seg(run_id)}/export", params={"format": format}, raw=True
        )

    @staticmethod
    def incidents(
        status: str | None = None,
        run_id: str | None = None,
        policy_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> ApiRequest[Any]:
        """``GET /v1/incidents``."""
        params = {
            "status": status,
            "run_id": run_id,
            "policy_id": policy_id,
            "limit": limit,
            "offset": offset,
        }
        return _json("GET", "/v1/incidents", params=params)

    @staticmethod
    def incident(incident_id: str) -> ApiRequest[Any]:
        """``GET /v1/incidents/{incident_id}``."""
        return _json("GET", f"/v1/incidents/{_seg(incident_id)}")

    @staticmethod
    def acknowledge_incident(incident_id: str, by: str | None = None) -> ApiRequest[Any]:
        """``POST /v1/incidents/{incident_id}/acknowledge``."""
        body = AcknowledgeRequest(by=by)
        return _json("POST", f"/v1/incidents/{_seg(incident_id)}/acknowledge", body)

    @staticmethod
    def resolve_incident(
        incident_id: str, resolution: str, by: str | None = None
    ) -> ApiRequest[Any]:
        """``POST /v1/incidents/{incident_id}/resolve``."""
        body = ResolveRequest(resolution=resolution, by=by)
        return _json("POST", f"/v1/incidents/{_seg(incident_id)}/resolve", body)

    @staticmethod
    def policies() -> ApiRequest[Any]:
        """``GET /v1/policies``."""
        return _json("GET", "/v1/policies")

    @staticmethod
    def costs(group_by: str = "run", run_id: str | None = None) -> ApiRequest[Any]:
        """``GET /v1/costs``."""
        return _json("GET", "/v1/costs", params={"group_by": group_by, "run_id": run_id})

    @staticmethod
    def prices() -> ApiRequest[Any]:
        """``GET /v1/prices``."""
        return _json("GET", "/v1/prices")

    @staticmethod
    def set_prices(prices: Iterable[ModelPriceIn | Mapping[str, Any]]) -> ApiRequest[Any]:
        """``PUT /v1/prices``."""
        body = SetPricesRequest(
            prices=[p if isinstance(p, ModelPriceIn) else ModelPriceIn(**p) for p in prices]
        )
        return _json("PUT", "/v1/prices", body)

    @staticmethod
    def rebuild_projections(admin_token: str) -> ApiRequest[Any]:
        """``POST /v1/admin/rebuild-projections`` with the operator token (``MC_ADMIN_TOKEN``)."""
        return ApiRequest(
            "POST", "/v1/admin/rebuild-projections", headers={"X-Admin-Token": admin_token}
        )


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}


class MissionControlClient:
    """Blocking client; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            transport=transport,
            limits=LIMITS,
        )

    def send(self, request: ApiRequest[T]) -> T:
        """Send a built request and read its answer."""
        return read_response(request, self._http.request(**request.to_httpx()))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> MissionControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_run(
        self, agent_id: str, run_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> RunStartedResponse:
        """Start a run."""
        return self.send(Requests.start_run(agent_id, run_id, labels))

    def admit(self, run_id: str, step_index: int, **kw: Any) -> AdmissionResponse:
        """Ask admission for a step (see :meth:`Requests.admit` for the keywords)."""
        return self.send(Requests.admit(run_id, step_index, **kw))

    def record_step(self, run_id: str, step_index: int, **fields: Any) -> StepsRecordedResponse:
        """Record one step."""
        return self.send(Requests.record_step(run_id, step_index, **fields))

    def report_usage(
        self, run_id: str, step_index: int, model: str | None = None, **usage: int
    ) -> UsageVerdict:
        """Report a running call's usage so far; the answer says whether to abort it."""
        return self.send(Requests.report_usage(run_id, step_index, model, **usage))

    def record_steps_batch(
        self, items: Iterable[StepBatchItem | Mapping[str, Any]]
    ) -> StepsRecordedResponse:
        """Record many steps at once."""
        return self.send(Requests.record_steps_batch(items))

    def finish_run(
        self, run_id: str, status: str = "completed", reason: str | None = None
    ) -> RunFinishedResponse:
        """End a run."""
        return self.send(Requests.finish_run(run_id, status, reason))

    def runs(self, **filters: Any) -> Any:
        """List runs (``status``, ``agent_id``, ``limit``, ``offset``)."""
        return self.send(Requests.runs(**filters))

    def run(self, run_id: str) -> Any:
        """One run."""
        return self.send(Requests.run(run_id))

    def trace(self, run_id: str) -> Any:
        """A run's trace."""
        return self.send(Requests.trace(run_id))

    def replay(
        self,
        run_id: str,
        at_position: int | None = None,
        at_version: int | None = None,
        at_step: int | None = None,
    ) -> Any:
        """A run replayed from the log, to a store position, run version or step."""
        return self.send(Requests.replay(run_id, at_position, at_version, at_step))

    def export(self, run_id: str, format: str = "json") -> bytes:
        """A run's audit record as a file."""
        return self.send(Requests.export(run_id, format))

    def incidents(self, **filters: Any) -> Any:
        """List incidents (``status``, ``run_id``, ``policy_id``, ``limit``, ``offset``)."""
        return self.send(Requests.incidents(**filters))

    def incident(self, incident_id: str) -> Any:
        """One incident."""
        return self.send(Requests.incident(incident_id))

    def acknowledge_incident(self, incident_id: str, by: str | None = None) -> Any:
        """Acknowledge an incident."""
        return self.send(Requests.acknowledge_incident(incident_id, by))

    def resolve_incident(self, incident_id: str, resolution: str, by: str | None = None) -> Any:
        """Resolve an incident."""
        return self.send(Requests.resolve_incident(incident_id, resolution, by))

    def policies(self) -> Any:
        """The active policies with incident counts."""
        return self.send(Requests.policies())

    def costs(self, group_by: str = "run", run_id: str | None = None) -> Any:
        """Costs grouped by run, agent or model."""
        return self.send(Requests.costs(group_by, run_id))

    def prices(self) -> Any:
        """The tenant's price table."""
        return self.send(Requests.prices())

    def set_prices(self, prices: Iterable[ModelPriceIn | Mapping[str, Any]]) -> Any:
        """Publish custom prices."""
        return self.send(Requests.set_prices(prices))

    def rebuild_projections(self, admin_token: str) -> Any:
        """Rebuild the query projections from the event store (needs the operator token)."""
        return self.send(Requests.rebuild_projections(admin_token))


class AsyncMissionControlClient:
    """Asyncio client; use as an async context manager or await :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            transport=transport,
            limits=LIMITS,
        )

    async def send(self, request: ApiRequest[T]) -> T:
        """Send a built request and read its answer."""
        return read_response(request, await self._http.request(**request.to_httpx()))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMissionControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start_run(
        self, agent_id: str, run_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> RunStartedResponse:
        """Start a run."""
        return await self.send(Requests.start_run(agent_id, run_id, labels))

    async def admit(self, run_id: str, step_index: int, **kw: Any) -> AdmissionResponse:
        """Ask admission for a step (see :meth:`Requests.admit` for the keywords)."""
        return await self.send(Requests.admit(run_id, step_index, **kw))

    async def record_step(
        self, run_id: str, step_index: int, **fields: Any
    ) -> StepsRecordedResponse:
        """Record one step."""
        return await self.send(Requests.record_step(run_id, step_index, **fields))

    async def report_usage(
        self, run_id: str, step_index: int, model: str | None = None, **usage: int
    ) -> UsageVerdict:
        """Report a running call's usage so far; the answer says whether to abort it."""
        return await self.send(Requests.report_usage(run_id, step_index, model, **usage))

    async def record_steps_batch(
        self, items: Iterable[StepBatchItem | Mapping[str, Any]]
    ) -> StepsRecordedResponse:
        """Record many steps at once."""
        return await self.send(Requests.record_steps_batch(items))

    async def finish_run(
        self, run_id: str, status: str = "completed", reason: str | None = None
    ) -> RunFinishedResponse:
        """End a run."""
        return await self.send(Requests.finish_run(run_id, status, reason))

    async def runs(self, **filters: Any) -> Any:
        """List runs (``status``, ``agent_id``, ``limit``, ``offset``)."""
        return await self.send(Requests.runs(**filters))

    async def run(self, run_id: str) -> Any:
        """One run."""
        return await self.send(Requests.run(run_id))

    async def trace(self, run_id: str) -> Any:
        """A run's trace."""
        return await self.send(Requests.trace(run_id))

    async def replay(
        self,
        run_id: str,
        at_position: int | None = None,
        at_version: int | None = None,
        at_step: int | None = None,
    ) -> Any:
        """A run replayed from the log, to a store position, run version or step."""
        return await self.send(Requests.replay(run_id, at_position, at_version, at_step))

    async def export(self, run_id: str, format: str = "json") -> bytes:
        """A run's audit record as a file."""
        return await self.send(Requests.export(run_id, format))

    async def incidents(self, **filters: Any) -> Any:
        """List incidents (``status``, ``run_id``, ``policy_id``, ``limit``, ``offset``)."""
        return await self.send(Requests.incidents(**filters))

    async def incident(self, incident_id: str) -> Any:
        """One incident."""
        return await self.send(Requests.incident(incident_id))

    async def acknowledge_incident(self, incident_id: str, by: str | None = None) -> Any:
        """Acknowledge an incident."""
        return await self.send(Requests.acknowledge_incident(incident_id, by))

    async def resolve_incident(
        self, incident_id: str, resolution: str, by: str | None = None
    ) -> Any:
        """Resolve an incident."""
        return await self.send(Requests.resolve_incident(incident_id, resolution, by))

    async def policies(self) -> Any:
        """The active policies with incident counts."""
        return await self.send(Requests.policies())

    async def costs(self, group_by: str = "run", run_id: str | None = None) -> Any:
        """Costs grouped by run, agent or model."""
        return await self.send(Requests.costs(group_by, run_id))

    async def prices(self) -> Any:
        """The tenant's price table."""
        return await self.send(Requests.prices())

    async def set_prices(self, prices: Iterable[ModelPriceIn | Mapping[str, Any]]) -> Any:
        """Publish custom prices."""
        return await self.send(Requests.set_prices(prices))

    async def rebuild_projections(self, admin_token: str) -> Any:
        """Rebuild the query projections from the event store (needs the operator token)."""
        return await self.send(Requests.rebuild_projections(admin_token))
