"""An example agent worker: the four agents of the example workflow ``release-notes-demo``.

Run it against a running system with an API key of your tenant (``mctl tenant key T``):

    export MC_API_KEY=mc_...
    python -m services.gateway.example_worker --base-url http://127.0.0.1:PORT --setup

``--setup`` registers the agents and saves the workflow first (both idempotent); then start
executions (``POST /v1/workflows/release-notes-demo/executions``) and watch the worker serve
them. Ctrl-C stops taking work and lets the steps in hand finish. ``mctl up --demo`` runs this
worker in its own event loop to drive its workflow.

Each agent stands for a real one: it asks admission for its model call, calls the model and
records the call with the usage the provider reported. The model is simulated: it answers each
task with usage shaped exactly as OpenAI, Anthropic and Gemini report it (cached prompt reads,
cache writes, reasoning), streamed in chunks where the real call would stream, so the cost
figures are those of a real call. Replace :func:`simulated_call` with your provider's client
and keep the rest.

While a streamed call runs, the worker hands the usage so far to its *reporter* after every
chunk (:data:`UsageReporter`); the default reports it to Mission Control.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from libs.usage import Provider, Usage, from_provider, from_stream
from services.gateway.client import ApiRequest, read_response
from services.gateway.worker import Step, Worker

WORKFLOW_ID = "release-notes-demo"

AGENTS = {
    "researcher": "gathers the changes and issues of a release",
    "writer": "summarises what changed",
    "reviewer": "reviews the summaries against the changes",
    "publisher": "publishes the release notes (cannot be undone)",
}


def _step(
    step_id: str, agent: str, cost_usd: str, depends_on: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "id": step_id,
        "agent": agent,
        "inputs": {"task": step_id},
        "depends_on": list(depends_on),
        "estimate": {"cost_usd": cost_usd},
        "timeout_s": 60,
        "retries": 1,
        "retry_backoff_s": 1,
        **extra,
    }


WORKFLOW: dict[str, Any] = {
    "name": WORKFLOW_ID,
    "description": "gather, summarise code and issues in parallel, review, publish",
    "steps": [
        _step("gather", "researcher", "0.008"),
        # Fan-out: both summaries depend on gather only, so they run in parallel.
        _step("summarise-code", "writer", "0.027", ("gather",)),
        _step("summarise-issues", "writer", "0.012", ("gather",)),
        # Fan-in: the review waits for both summaries.
        _step(
            "review", "reviewer", "0.004", ("summarise-code", "summarise-issues"), risk_tier="write"
        ),
        # Publishing cannot be undone: it waits for a person's approval.
        _step("publish", "publisher", "0.0005", ("review",), risk_tier="irreversible"),
    ],
}
"""The example workflow: five steps with a parallel branch; each step's estimate is at least
what its call below costs at the built-in prices."""


@dataclass(frozen=True)
class ModelCall:
    """One simulated model call: its provider and model, the usage object the provider reports
    for it (its own field names and meanings), and in how many chunks it streams (0: not
    streamed)."""

    provider: Provider
    model: str
    usage: Mapping[str, Any]
    chunks: int = 0
    text: str = ""


CALLS: dict[str, ModelCall] = {
    # o4-mini reasons before it answers; most of its prompt is a cached system prompt.
    "gather": ModelCall(
        "openai", "o4-mini",
        {"prompt_tokens": 6000, "completion_tokens": 900,
         "prompt_tokens_details": {"cached_tokens": 4096},
         "completion_tokens_details": {"reasoning_tokens": 512}},
        text="42 commits, 17 closed issues",
    ),
    # The first summary writes the shared instructions to Anthropic's prompt cache ...
    "summarise-code": ModelCall(
        "anthropic", "claude-sonnet-4",
        {"input_tokens": 1500, "cache_creation_input_tokens": 3000,
         "cache_read_input_tokens": 0, "output_tokens": 700},
        chunks=5, text="the API gained pagination; two endpoints were deprecated",
    ),
    # ... and the second reads them from it (Anthropic counts both apart from input_tokens).
    "summarise-issues": ModelCall(
        "anthropic", "claude-sonnet-4",
        {"input_tokens": 900, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 3000, "output_tokens": 500},
        chunks=4, text="17 issues closed, among them the login timeout",
    ),
    # Gemini reports its thoughts apart from the answer's tokens.
    "review": ModelCall(
        "gemini", "gemini-2.5-flash",
        {"promptTokenCount": 5000, "cachedContentTokenCount": 3000,
         "candidatesTokenCount": 600, "thoughtsTokenCount": 400},
        chunks=4, text="approved: both summaries match the changes",
    ),
    "publish": ModelCall(
        "openai", "gpt-4o-mini",
        {"prompt_tokens": 1200, "completion_tokens": 300,
         "prompt_tokens_details": {"cached_tokens": 0}},
        text="release notes published",
    ),
}  # fmt: skip
"""What each task's model call reports, by the ``task`` input of its step."""

UsageReporter = Callable[[Step, str, Usage], Awaitable[None]]
"""Called with the step, the model and the usage so far, after each chunk of a streamed call."""


async def print_usage(step: Step, model: str, usage: Usage) -> None:
    """A reporter for trying the worker alone: one line per chunk with the step's usage so far."""
    print(f"  live  {step.step_id:<18} {model:<18} {usage_line(usage)}", flush=True)


async def report_usage(step: Step, model: str, usage: Usage) -> None:
    """The default reporter: the usage so far goes to Mission Control (``Step.report_usage``),
    where viewers of the execution's event stream see it and budgets may stop the step; a
    stop raises :class:`~services.gateway.worker.StepAborted` out of the handler."""
    await step.report_usage(usage, model=model)


def usage_line(usage: Usage) -> str:
    """``6,000 in (4,096 cached, 0 cache write) · 900 out (512 reasoning)``."""
    return (
        f"{usage.input_tokens:>6,} in ({usage.cached_input_tokens:,} cached, "
        f"{usage.cache_write_tokens:,} cache write) · {usage.output_tokens:>5,} out "
        f"({usage.reasoning_tokens:,} reasoning)"
    )


def stream_chunks(call: ModelCall) -> Iterator[dict[str, Any]]:
    """The chunks the provider would stream for ``call``, each carrying its usage so far, in
    the provider's own format (what ``libs.usage.from_stream`` reads)."""
    n = max(call.chunks, 1)
    if call.provider == "anthropic":
        start = {k: v for k, v in call.usage.items() if k != "output_tokens"}
        yield {"type": "message_start", "message": {"usage": {**start, "output_tokens": 1}}}
        for i in range(1, n + 1):
            out = call.usage["output_tokens"] * i // n
            yield {"type": "message_delta", "usage": {"output_tokens": out}}
    elif call.provider == "gemini":
        for i in range(1, n + 1):
            meta = dict(call.usage)
            meta["candidatesTokenCount"] = call.usage["candidatesTokenCount"] * i // n
            # Gemini thinks before it answers: the thoughts are all there from the first chunk.
            yield {"usageMetadata": meta}
    else:
        # OpenAI sends usage once, in its last chunk (with stream_options.include_usage).
        for _ in range(n - 1):
            yield {"choices": [{"delta": {"content": "..."}}]}
        yield {"choices": [], "usage": dict(call.usage)}


async def simulated_call(
    call: ModelCall, report: Callable[[Usage], Awaitable[None]], latency_s: float
) -> Usage:
    """Call the (simulated) model: its final usage. A streamed call reports its usage so far
    after every chunk that carries some; another call reports its usage once, at its end."""
    if not call.chunks:
        await asyncio.sleep(latency_s)  # the model's latency
        usage = from_provider(call.provider, _usage_payload(call))
        await report(usage)  # all at once: the usage of a call that does not stream
        return usage
    seen: list[dict[str, Any]] = []
    for chunk in stream_chunks(call):
        await asyncio.sleep(latency_s / call.chunks)  # the model producing the next chunk
        seen.append(chunk)
        try:
            so_far = from_stream(call.provider, seen)
        except ValueError:
            continue  # no usage in the stream yet
        await report(so_far)
    return from_stream(call.provider, seen)


@dataclass
class ExampleAgents:
    """The handlers of the example agents, with where they report streamed usage."""

    report: UsageReporter = report_usage
    latency_s: float = 0.4
    """How long a simulated call takes."""
    calls: Mapping[str, ModelCall] = field(default_factory=lambda: CALLS)

    async def serve(self, step: Step) -> dict[str, Any]:
        """Serve one step: admission, the model call, then the call recorded with its usage."""
        task = str(step.inputs.get("task", step.step_id))
        call = self.calls.get(task)
        if call is None:
            raise ValueError(f"no model call for task {task!r}; known: {sorted(self.calls)}")
        expected = from_provider(call.provider, _usage_payload(call))
        await step.admit(
            model=call.model,
            input_tokens=expected.input_tokens,
            max_output_tokens=expected.output_tokens,
        )
        started = time.perf_counter()

        async def report(usage: Usage) -> None:
            await self.report(step, call.model, usage)

        usage = await simulated_call(call, report, self.latency_s)
        output = {"task": task, "text": call.text}
        await step.record(
            model=call.model,
            usage=usage,
            duration_ms=(time.perf_counter() - started) * 1000,
            input={"task": task},
            output=output,
        )
        return output


def _usage_payload(call: ModelCall) -> dict[str, Any]:
    return {("usageMetadata" if call.provider == "gemini" else "usage"): dict(call.usage)}


def build_worker(
    base_url: str,
    api_key: str,
    *,
    report: UsageReporter = report_usage,
    latency_s: float = 0.4,
    poll_s: float = 20.0,
) -> Worker:
    """A worker serving every agent of :data:`AGENTS` with :class:`ExampleAgents`."""
    worker = Worker(base_url, api_key, poll_s=poll_s)
    agents = ExampleAgents(report=report, latency_s=latency_s)
    for name in AGENTS:
        worker.agent(name)(agents.serve)
    return worker


async def api(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    body: Any = None,
    params: Mapping[str, Any] | None = None,
    auth: str | None = None,
) -> Any:
    """One JSON call to the API (as ``auth``, a bearer token, when given, else as ``http``'s
    credentials): the answer, or :class:`~services.gateway.client.ApiError`."""
    request: ApiRequest[Any] = ApiRequest(method, path)
    headers = {"Authorization": f"Bearer {auth}"} if auth else None
    response = await http.request(method, path, json=body, params=params, headers=headers)
    return read_response(request, response)


async def install(http: httpx.AsyncClient) -> int:
    """Register :data:`AGENTS` and save :data:`WORKFLOW` (both idempotent); its version."""
    for agent_id, description in AGENTS.items():
        await api(http, "POST", "/v1/agents", {"agent_id": agent_id, "description": description})
    saved = await api(http, "POST", "/v1/workflows", WORKFLOW)
    return int(saved["version"])


async def _main(base_url: str, api_key: str, setup: bool) -> None:
    if setup:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
            version = await install(http)
        print(f"workflow {WORKFLOW_ID} version {version} saved; agents {', '.join(AGENTS)}")
        print(
            f"start an execution: curl -X POST {base_url}/v1/workflows/{WORKFLOW_ID}/executions"
            ' -H "Authorization: Bearer $MC_API_KEY" -H "Content-Type: application/json"'
            " -d '{}'"
        )
    worker = build_worker(base_url, api_key)
    print(f"serving {', '.join(AGENTS)}; Ctrl-C stops", flush=True)
    await worker.run_until_signalled()


def main(argv: list[str] | None = None) -> None:
    """``python -m services.gateway.example_worker``."""
    parser = argparse.ArgumentParser(prog="python -m services.gateway.example_worker")
    parser.add_argument("--base-url", required=True, help="The gateway's URL.")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MC_API_KEY"),
        help="An API key of your tenant (default: $MC_API_KEY).",
    )
    parser.add_argument(
        "--setup", action="store_true", help="Register the agents and save the workflow first."
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is needed: --api-key or $MC_API_KEY")
    asyncio.run(_main(args.base_url.rstrip("/"), args.api_key, args.setup))


if __name__ == "__main__":
    main()
