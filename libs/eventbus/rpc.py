"""Request–reply over core NATS for commands and queries, with deadlines.

A request carries ``Mc-Deadline`` (unix ms); a server that receives it too late does not start the
work. Replies are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {code, message}}``,
and errors come back to the caller as the same project error classes.
"""

from __future__ import annotations

import time
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
    )
}


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
    """Serves ``mc.rpc.<service>.<method>`` subjects in a queue group named after the service."""

    def __init__(self, nc: NATS, service: str) -> None:
        self.nc = nc
        self.service = service
        self._routes: dict[str, RpcHandler] = {}
        self._subs: list[Subscription] = []

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
        """Unsubscribe (in-flight requests finish)."""
        for s in self._subs:
            await s.unsubscribe()
        self._subs.clear()

    def _wrap(self, handler: RpcHandler) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            headers = dict(msg.headers or {})
            bind_from_headers(headers)
            deadline = headers.get("Mc-Deadline")
            if deadline and int(deadline) < time.time() * 1000:
                # The caller has given up; doing the work now only adds load.
                return
            try:
                payload = orjson.loads(msg.data) if msg.data else {}
                if not isinstance(payload, dict):
                    raise errors.InvalidInput("request body must be a JSON object")
                result = await handler(payload, headers)
                body = orjson.dumps({"ok": True, "result": result})
            except errors.MissionControlError as exc:
                body = orjson.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}})
            except orjson.JSONDecodeError as exc:
                body = orjson.dumps(
                    {"ok": False, "error": {"code": "invalid_input", "message": f"bad JSON: {exc}"}}
                )
            except Exception as exc:
                log.exception("rpc.handler_failed", subject=msg.subject)
                body = orjson.dumps(
                    {"ok": False, "error": {"code": "internal", "message": repr(exc)[:500]}}
                )
            if msg.reply:
                if len(body) > self.nc.max_payload - 4096:
                    # Over the bus's limit the reply would be dropped and the caller would only
                    # see a timeout; tell it what happened instead.
                    body = orjson.dumps(
                        {
                            "ok": False,
                            "error": {
                                "code": "too_large",
                                "message": f"the answer is {len(body):,} bytes, over the "
                                f"{self.nc.max_payload:,} bytes a message may carry; "
                                "ask for less (filters, a smaller limit)",
                            },
                        }
                    )
                await msg.respond(body)

        return cb


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
