"""Request–reply over core NATS for commands and queries, with deadlines and load shedding.

A request carries ``Mc-Deadline`` (unix ms); a server that receives it too late does not start the
work. Each server bounds the requests it has in flight (``MC_RPC_MAX_IN_FLIGHT``, 64 by default:
enough to keep the database pool busy and let a handler batch what arrives together, few enough
that the last one admitted is answered in well under a second); above the bound it answers
:class:`~libs.errors.Overloaded` at once instead of letting requests queue for seconds.

Replies are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {code, message}}``, and
errors come back to the caller as the same project error classes.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from libs import errors
from libs.contracts.envelope import TraceContext, new_uuid7
from libs.contracts.subjects import rpc_subject
from libs.observability import bind_from_headers, inject_headers
from libs.settings import get_settings

log = structlog.get_logger("rpc")

RpcHandler = Callable[[dict[str, Any], dict[str, str]], Awaitable[Any]]

_ERRORS: dict[str, type[errors.MissionControlError]] = {
    cls.code: cls
    for cls in (
        errors.MissionControlError,
        errors.TransientError,
        errors.PermanentError,
        errors.InvalidInput,
        errors.NotFound,
        errors.Conflict,
        errors.Unauthorized,
        errors.UnknownEventType,
        errors.TooLarge,
        errors.DeadlineExceeded,
        errors.Overloaded,
    )
}

# How long stop() lets the requests in hand finish before it returns.
STOP_TIMEOUT_S = 5.0

_servers: weakref.WeakSet[RpcServer] = weakref.WeakSet()


def rpc_servers() -> list[RpcServer]:
    """The RPC servers alive in this process (for their metrics)."""
    return list(_servers)


def _error_body(exc: errors.MissionControlError) -> bytes:
    return orjson.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}})


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], payload: dict[str, Any]) -> M:
    """Validate a request body; :class:`InvalidInput` names the first offending field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise errors.InvalidInput(f"{where}: {first['msg']}") from None


@dataclass(frozen=True)
class RequestMeta:
    """Envelope metadata a request carries in its headers, for the events it causes."""

    correlation_id: str
    trace_context: TraceContext
    actor: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RequestMeta:
        """Correlation id (a new one when absent), trace context and explicit actor."""
        return cls(
            correlation_id=headers.get("Mc-Correlation-Id") or str(new_uuid7()),
            trace_context=TraceContext(
                traceparent=headers.get("traceparent"), tracestate=headers.get("tracestate")
            ),
            actor=headers.get("Mc-Actor") or None,
        )

    def actor_for(self, agent_id: str) -> str:
        """``Mc-Actor`` when the caller named one, else the agent the run belongs to."""
        return self.actor or f"agent:{agent_id}"


class RpcServer:
    """Serves ``mc.rpc.<service>.<method>`` subjects in a queue group named after the service.

    Every request runs in its own task, so one slow request does not hold up the others; at most
    ``max_in_flight`` run at once (all routes together). A request above the bound is answered
    ``overloaded`` straight away, and one whose ``Mc-Deadline`` has passed is answered
    ``deadline_exceeded`` without being worked on: the caller has given up, so the work would only
    add load.
    """

    def __init__(self, nc: NATS, service: str, *, max_in_flight: int | None = None) -> None:
        self.nc = nc
        self.service = service
        self.max_in_flight = (
            max_in_flight if max_in_flight is not None else get_settings().rpc_max_in_flight
        )
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._routes: dict[str, RpcHandler] = {}
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        """Requests answered ``overloaded`` since start (for metrics and tests)."""
        self.expired = 0
        """Requests dropped because their deadline had passed on arrival."""
        _servers.add(self)

    @property
    def in_flight(self) -> int:
        """Requests being worked on now."""
        return len(self._tasks)

    def route(self, method: str, handler: RpcHandler) -> None:
        """Register ``handler(payload, headers) -> result`` for ``method``."""
        self._routes[method] = handler

    async def start(self) -> None:
        """Subscribe every registered route."""
        for method, handler in self._routes.items():
            sub = await self.nc.subscribe(
                rpc_subject(self.service, method), queue=self.service, cb=self._wrap(handler)
            )
            self._subs.append(sub)

    async def stop(self) -> None:
        """Unsubscribe, then let the requests in hand finish (for up to a few seconds)."""
        for s in self._subs:
            await s.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT_S)

    def _wrap(self, handler: RpcHandler) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            # nats.py awaits this callback before it delivers the subscription's next message, so
            # it only admits or refuses; the work runs in a task of its own.
            if len(self._tasks) >= self.max_in_flight:
                self.refused += 1
                await self._reply(
                    msg,
                    _error_body(
                        errors.Overloaded(
                            f"{self.service} is at its limit of {self.max_in_flight} requests "
                            "in flight; retry shortly"
                        )
                    ),
                )
                return
            task = asyncio.create_task(self._handle(handler, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return cb

    async def _handle(self, handler: RpcHandler, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        bind_from_headers(headers)
        deadline = headers.get("Mc-Deadline")
        if deadline and deadline.isdigit() and int(deadline) < time.time() * 1000:
            self.expired += 1
            await self._reply(
                msg,
                _error_body(errors.DeadlineExceeded("the request's deadline passed before it ran")),
            )
            return
        try:
            payload = orjson.loads(msg.data) if msg.data else {}
            if not isinstance(payload, dict):
                raise errors.InvalidInput("request body must be a JSON object")
            result = await handler(payload, headers)
            body = orjson.dumps({"ok": True, "result": result})
        except errors.MissionControlError as exc:
            body = _error_body(exc)
        except orjson.JSONDecodeError as exc:
            body = _error_body(errors.InvalidInput(f"bad JSON: {exc}"))
        except Exception as exc:
            log.exception("rpc.handler_failed", subject=msg.subject)
            body = orjson.dumps(
                {"ok": False, "error": {"code": "internal", "message": repr(exc)[:500]}}
            )
        await self._reply(msg, body)

    async def _reply(self, msg: Msg, body: bytes) -> None:
        if not msg.reply:
            return
        if len(body) > self.nc.max_payload - 4096:
            # Over the bus's limit the reply would be dropped and the caller would only see a
            # timeout; tell it what happened instead.
            body = _error_body(
                errors.TooLarge(
                    f"the answer is {len(body):,} bytes, over the {self.nc.max_payload:,} bytes "
                    "a message may carry; ask for less (filters, a smaller limit)"
                )
            )
        try:
            await msg.respond(body)
        except Exception:
            # The connection is closing (shutdown, NATS restart): the caller times out and retries.
            log.warning("rpc.reply_failed", subject=msg.subject)


class RpcClient:
    """Calls services' request subjects."""

    def __init__(self, nc: NATS, default_timeout: float = 5.0) -> None:
        self.nc = nc
        self.default_timeout = default_timeout

    async def call(
        self,
        service: str,
        method: str,
        payload: dict[str, Any],
        *,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send a request and return its result, or raise the project error it answered with."""
        t = timeout or self.default_timeout
        h = inject_headers(headers)
        h["Mc-Deadline"] = str(int((time.time() + t) * 1000))
        subject = rpc_subject(service, method)
        try:
            msg = await self.nc.request(subject, orjson.dumps(payload), timeout=t, headers=h)
        except NoRespondersError as exc:
            raise errors.TransientError(f"{service} is not available (no responders)") from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            raise errors.DeadlineExceeded(f"{service}.{method} did not answer within {t}s") from exc
        reply = orjson.loads(msg.data)
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        cls = _ERRORS.get(err.get("code", "internal"), errors.MissionControlError)
        raise cls(err.get("message", "unknown error"))
