"""The agent worker SDK: serve the workflow steps Mission Control dispatches to your agents.

    from libs.usage import from_openai

    worker = Worker(gateway_url, api_key)

    @worker.agent("summarizer")
    async def summarize(step: Step) -> Any:
        decision = await step.admit(model="gpt-4o-mini", input_tokens=800, max_output_tokens=200)
        response = await call_the_model(step.inputs["document"])
        await step.record(model="gpt-4o-mini", usage=from_openai(response), output=response)
        return response

    await worker.run()        # until worker.stop() or SIGTERM

While a call streams, the handler reports its usage so far with :meth:`Step.report_usage`
(cumulative counts; at most every 250 ms are sent): viewers of the run's and execution's event
streams see the tokens move, and the engine checks the cost so far against the budgets. When a
budget cannot take it (or the run has ended) the call raises :class:`StepAborted`: the handler
stops, and the worker ends the attempt as failed with that reason; the engine has already
blocked the step, so it is not retried.

Each dispatched attempt of a step waits on the agent's JetStream work queue
(``mc.work.<tenant>.<agent>``); the worker takes it through the gateway with its API key
(``POST /v1/agents/{agent}/work:take``, a long poll), so it needs no bus credentials and sees only
its own tenant's work. The attempt is a governed run that the engine has
already started: the handler asks admission before every model or tool call (:meth:`Step.admit`,
which raises :class:`StepDenied` when policy says no) and records each call with the usage the
provider reported (:meth:`Step.record`; docs/cost.md). When the handler returns, the worker
finishes the run as completed; when it raises, as failed with the error's first line, and the
engine retries the step if its definition allows. A worker that dies mid-step loses nothing:
the engine's deadline fails that attempt and dispatches the next one.

The worker acknowledges a work item as soon as it takes it, so one attempt never runs twice; the
engine's timeouts and retries are what make a step happen at least once. :meth:`Worker.stop` (or
SIGTERM under :meth:`Worker.run_until_signalled`) stops taking work and waits for the steps in hand
to finish.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from libs.usage import Usage
from services.gateway.client import (
    LIMITS,
    ApiError,
    ApiRequest,
    AsyncMissionControlClient,
    Requests,
)
from services.gateway.schemas import AdmissionResponse, UsageVerdict

log = structlog.get_logger("mission_control.worker")

Handler = Callable[["Step"], Awaitable[Any]]

REPORT_INTERVAL_S = 0.25
"""The least time between two usage reports of a step (unless one is forced)."""


class StepDenied(Exception):
    """Admission denied a call of the step: the run is stopped and the step is blocked."""

    def __init__(self, decision: AdmissionResponse) -> None:
        super().__init__("; ".join(r.message for r in decision.reasons) or "denied by policy")
        self.decision = decision


class StepAborted(Exception):
    """Mission Control stopped the step mid-way: a budget cannot take the usage streamed so far,
    or the step's run has ended (timed out, aborted). The handler must stop; the worker ends
    the attempt as failed with :attr:`reason`, and the step is not retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in (429, 502, 503, 504)
    return isinstance(exc, OSError | TimeoutError)


@dataclass
class Step:
    """One dispatched attempt of a workflow step, as its handler sees it."""

    tenant_id: str
    execution_id: str
    workflow_id: str
    step_id: str
    attempt: int
    run_id: str
    agent_id: str
    inputs: dict[str, Any]
    risk_tier: str
    deadline_at: datetime
    _client: AsyncMissionControlClient = field(repr=False)
    _patience_s: float = field(default=60.0, repr=False)
    _next_index: int = field(default=1, repr=False)
    _report_interval_s: float = field(default=REPORT_INTERVAL_S, repr=False)
    _last_report: float = field(default=-float("inf"), repr=False)
    _aborted: str | None = field(default=None, repr=False)

    async def _send(self, request: ApiRequest[Any]) -> Any:
        # Only overload and unavailability are retried: a 4xx is an answer, not a hiccup. A
        # service restarting behind the gateway answers 503 for a few seconds: keep trying for
        # up to `patience_s`, so a restart costs the step time, not its result.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_delay(self._patience_s),
            wait=wait_exponential_jitter(multiplier=0.1, max=2),
            reraise=True,
        ):
            with attempt:
                return await self._client.send(request)
        raise AssertionError("unreachable")  # pragma: no cover

    async def admit(
        self,
        *,
        model: str | None = None,
        tool: str | None = None,
        kind: str = "llm_call",
        input_tokens: int = 0,
        max_output_tokens: int = 0,
    ) -> AdmissionResponse:
        """Ask admission for the next call of this step; raises :class:`StepDenied` on deny."""
        request = Requests.admit(
            self.run_id,
            self._next_index,
            kind=kind,
            model=model,
            tool=tool,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
        )
        decision: AdmissionResponse = await self._send(request)
        if decision.outcome == "deny":
            raise StepDenied(decision)
        return decision

    async def report_usage(
        self,
        usage: Usage | None = None,
        *,
        model: str | None = None,
        force: bool = False,
        **counts: int,
    ) -> UsageVerdict | None:
        """Report the usage so far of the call in progress (the one :meth:`record` records next):
        cumulative counts, as a ``libs.usage.Usage`` or as keywords (``input_tokens``,
        ``cached_input_tokens``, ``cache_write_tokens``, ``output_tokens``,
        ``reasoning_tokens``).

        Reports closer than 250 ms to the previous one are skipped (``None``) unless ``force``;
        a report the gateway cannot take now (429, 5xx, unreachable) is skipped too: progress is
        for viewers and budgets, and the recorded step stays the record. Raises
        :class:`StepAborted` when told to stop, and on every call after that.
        """
        if self._aborted is not None:
            raise StepAborted(self._aborted)
        now = time.monotonic()
        if not force and now - self._last_report < self._report_interval_s:
            return None
        self._last_report = now
        fields = {**counts, **(usage.fields() if usage is not None else {})}
        request = Requests.report_usage(self.run_id, self._next_index, model, **fields)
        try:
            verdict: UsageVerdict = await self._client.send(request)
        except Exception as exc:
            if not _transient(exc):
                raise
            log.info("worker.usage_report_skipped", run_id=self.run_id, error=type(exc).__name__)
            return None
        if verdict.abort:
            self._aborted = verdict.reason or "stopped by Mission Control"
            raise StepAborted(self._aborted)
        return verdict

    async def record(self, *, usage: Usage | None = None, **fields: Any) -> None:
        """Record the admitted call's outcome and usage (fields as in the steps endpoint).

        ``usage`` is the call's usage mapped by ``libs.usage`` from the provider's own usage
        object (``usage=from_anthropic(response)``); it fills ``input_tokens``,
        ``cached_input_tokens``, ``cache_write_tokens``, ``output_tokens`` and
        ``reasoning_tokens``. A streamed call records once, when the stream has ended, with the
        final usage (``usage=from_stream("openai", chunks)``). ``provider_cost_usd`` keeps the
        provider's own cost figure beside the computed one.
        """
        if usage is not None:
            fields = {**fields, **usage.fields()}
        await self._send(Requests.record_step(self.run_id, self._next_index, **fields))
        self._next_index += 1


class Worker:
    """Serves the steps dispatched to the agents registered with :meth:`agent`."""

    def __init__(
        self,
        gateway_url: str,
        api_key: str,
        *,
        concurrency: int = 4,
        patience_s: float = 60.0,
        poll_s: float = 20.0,
    ) -> None:
        self.gateway_url = gateway_url
        self._api_key = api_key
        self.concurrency = concurrency
        self.patience_s = patience_s
        """How long a call to the API is retried while it answers 429 or 5xx."""
        self.poll_s = poll_s
        """How long one request for work waits for an item."""
        self._handlers: dict[str, Handler] = {}
        self._stopping = asyncio.Event()
        self._in_hand: set[asyncio.Task[None]] = set()
        self.taken: list[str] = []
        """Run ids of the attempts this worker took, in order (for operators and tests)."""

    def agent(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: ``handler(step)`` serves the steps dispatched to agent ``name``."""

        def register(handler: Handler) -> Handler:
            self._handlers[name] = handler
            return handler

        return register

    def stop(self) -> None:
        """Stop taking work; :meth:`run` returns once the steps in hand have finished."""
        self._stopping.set()

    async def run_until_signalled(self) -> None:
        """:meth:`run`, stopping gracefully on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.run()

    async def run(self) -> None:
        """Take and serve work until :meth:`stop`."""
        if not self._handlers:
            raise ValueError("register at least one agent with @worker.agent(name)")
        client = AsyncMissionControlClient(self.gateway_url, self._api_key)
        poller = httpx.AsyncClient(
            base_url=self.gateway_url,
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=self.poll_s + 15,
            limits=LIMITS,
        )
        try:
            pullers = [
                asyncio.create_task(self._pull(poller, agent, handler, client))
                for agent, handler in self._handlers.items()
            ]
            await self._stopping.wait()
            for p in pullers:
                p.cancel()
            await asyncio.gather(*pullers, return_exceptions=True)
            if self._in_hand:
                await asyncio.gather(*self._in_hand, return_exceptions=True)
        finally:
            await poller.aclose()
            await client.aclose()

    async def _take(self, poller: httpx.AsyncClient, agent: str) -> dict[str, Any] | None:
        try:
            r = await poller.post(f"/v1/agents/{agent}/work:take", params={"wait_s": self.poll_s})
        except httpx.TransportError as exc:
            log.warning("worker.poll_failed", agent=agent, error=type(exc).__name__)
            await asyncio.sleep(1)  # the gateway is unreachable: try again shortly
            return None
        if r.status_code == 204:
            return None
        if r.status_code in (429, 502, 503, 504):
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            return None
        if r.status_code != 200:
            raise ApiError(r.status_code, "take_work_failed", r.text[:500])
        item: dict[str, Any] = r.json()
        return item

    async def _pull(
        self,
        poller: httpx.AsyncClient,
        agent: str,
        handler: Handler,
        client: AsyncMissionControlClient,
    ) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while not self._stopping.is_set():
            await slots.acquire()
            item = await self._take(poller, agent)
            if item is None:
                slots.release()
                continue
            task = asyncio.create_task(self._serve(item, handler, client))
            self._in_hand.add(task)
            task.add_done_callback(self._in_hand.discard)
            task.add_done_callback(lambda _t: slots.release())

    async def _serve(
        self, item: dict[str, Any], handler: Handler, client: AsyncMissionControlClient
    ) -> None:
        step = Step(
            tenant_id=item["tenant_id"],
            execution_id=item["execution_id"],
            workflow_id=item["workflow_id"],
            step_id=item["step_id"],
            attempt=item["attempt"],
            run_id=item["run_id"],
            agent_id=item["agent_id"],
            inputs=item["inputs"],
            risk_tier=item["risk_tier"],
            deadline_at=datetime.fromisoformat(item["deadline_at"]),
            _client=client,
            _patience_s=self.patience_s,
        )
        self.taken.append(step.run_id)
        bound = log.bind(run_id=step.run_id, step_id=step.step_id, attempt=step.attempt)
        try:
            await handler(step)
        except StepAborted as aborted:
            # The engine stopped the step (and ended its run): finishing it is a formality.
            bound.info("worker.step_aborted", reason=aborted.reason)
            await self._finish(step, "failed", f"stopped: {aborted.reason}"[:500])
            return
        except StepDenied as denied:
            # The run is already stopped by policy; the engine blocks the step from that.
            bound.info("worker.step_denied", reason=str(denied))
            return
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
            bound.warning("worker.step_failed", error=type(exc).__name__)
            await self._finish(step, "failed", f"{type(exc).__name__}: {reason}")
            return
        await self._finish(step, "completed", None)

    async def _finish(self, step: Step, status: str, reason: str | None) -> None:
        try:
            await step._send(Requests.finish_run(step.run_id, status, reason))
        except ApiError as exc:
            # 409: the run already ended (timed out, aborted): the engine has moved on.
            if exc.status != 409:
                raise
