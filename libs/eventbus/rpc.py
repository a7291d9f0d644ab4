"""Request–reply over core NATS for commands and queries, with deadlines and load shedding.

A request carries ``Mc-Deadline`` (unix ms); a server that receives it too late does not start the
work. Each server bounds the requests it has in flight (``MC_RPC_MAX_IN_FLIGHT``, 64 by default:
enough to keep the database pool busy and let a handler batch what arrives together, few enough
that the last one admitted is answered in well under a second); above the bound it answers
:class:`~libs.errors.Overloaded` at once instead of letting requests queue for seconds.

Replies are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {code, message}}``, and
errors come back to the caller as the same project error classes.

The server's routes are FastStream NATS subscribers with pydantic-parsed arguments; what FastStream
does not do (the bound, deadlines, the envelope, answers too large for the bus) is a router
middleware here. A route registered ``hot=True`` is served on bare nats-py with the same
behaviour, for the path where FastStream's per-message cost matters (docs/benchmarks.md). The
client is plain nats-py.

An answer larger than a NATS message goes back in parts to a caller that takes them (header
``Mc-Reply-Chunks: 1``, which :class:`RpcClient` sends unless told not to). The reply carries the
first part, how many there are (``Mc-Chunks``), a token (``Mc-Chunk-Token``) and the subject to ask
for the others (``Mc-Chunk-Subject``: ``mc.rpc.<service>._part.<replica>``, served in the
service's queue group by the replica that holds the answer, so it is a request like any other
under the bus's permissions). The client asks for each next part with one request and joins them.
The replica keeps an answer until its last part is taken or :data:`PART_TTL_S` passes (a timer
frees it then, so a caller that went away does not keep it in memory), at most
:data:`MAX_HELD_BYTES` of them at once. Without that header such an answer is ``too_large`` as
before; over :data:`MAX_CHUNKED_BYTES` it is ``too_large`` either way (page such reads instead).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Annotated, Any, TypeVar, get_type_hints

import orjson
import structlog
from faststream import Depends
from faststream.message import StreamMessage
from faststream.middlewares import BaseMiddleware
from faststream.nats import NatsBroker, NatsRouter
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError

from libs import errors
from libs.contracts.envelope import TraceContext, new_uuid7
from libs.contracts.limits import agent_actor
from libs.contracts.subjects import RPC_PREFIX, rpc_subject
from libs.observability import bind_from_headers, extract_context, inject_headers, tracer
from libs.redaction import redact_text
from libs.settings import get_settings

log = structlog.get_logger("rpc")
_tracer = tracer("libs.eventbus.rpc")

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
        errors.Forbidden,
        errors.UnknownEventType,
        errors.TooLarge,
        errors.DeadlineExceeded,
        errors.Overloaded,
    )
}

# How long stop() lets the requests in hand finish before it returns.
STOP_TIMEOUT_S = 5.0
# A caller that joins answers sent in parts sends this header; the first part carries the others.
CHUNKS_REQUEST_HEADER = "Mc-Reply-Chunks"
CHUNKS_HEADER = "Mc-Chunks"
CHUNK_TOKEN_HEADER = "Mc-Chunk-Token"  # noqa: S105 - a header's name
CHUNK_SUBJECT_HEADER = "Mc-Chunk-Subject"
PART_ERROR_HEADER = "Mc-Part-Error"
# The largest answer sent in parts: the caller holds it whole in memory.
MAX_CHUNKED_BYTES = 64 * 1024 * 1024
# How much a replica holds of answers whose parts are being taken, and for how long at most.
MAX_HELD_BYTES = 256 * 1024 * 1024
PART_TTL_S = 120.0
# Room kept in each message for the headers.
_HEADER_ROOM = 4096

_servers: weakref.WeakSet[RpcServer] = weakref.WeakSet()


def rpc_servers() -> list[RpcServer]:
    """The RPC servers alive in this process (for their metrics)."""
    return list(_servers)


def _error_body(exc: errors.MissionControlError) -> bytes:
    return orjson.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}})


def _internal_body(exc: Exception) -> bytes:
    # The caller learns what failed, never the secrets or payload values the error may quote.
    message = redact_text(repr(exc))[:500]
    return orjson.dumps({"ok": False, "error": {"code": "internal", "message": message}})


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
        return self.actor or agent_actor(agent_id)


class _SharedConnectionBroker(NatsBroker):
    """A FastStream broker on the service's existing NATS connection.

    A service holds one connection for its consumer, its publisher and its requests; a second one
    per broker would only double the sockets and the reconnect handling. The broker neither opens
    nor drains it: the service host owns its life.
    """

    def __init__(self, nc: NATS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shared = nc

    async def _connect(self) -> NATS:
        self.config.connect(self._shared)
        return self._shared

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        # Unsubscribe first, so that a request sent now finds another replica (or no responders)
        # instead of waiting out its deadline while the requests in hand finish.
        for sub in self.subscribers:
            subscription = getattr(sub, "subscription", None)
            if subscription is not None:
                await subscription.unsubscribe()
                sub.subscription = None  # type: ignore[attr-defined]
        # NatsBroker.stop drains its connection, which belongs to the host: leave it out.
        self._connection = None
        await super().stop(exc_type, exc_val, exc_tb)


async def _decode(msg: StreamMessage[Any]) -> dict[str, Any]:
    """FastStream decoder: see :func:`_body`."""
    return _body(msg.body)


def _body(data: bytes) -> dict[str, Any]:
    """A request body is one JSON object; anything else is the caller's mistake (4xx)."""
    if not data:
        return {}
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidInput(f"bad JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise errors.InvalidInput("request body must be a JSON object")
    return payload


def _invalid_input(exc: ValidationError, skip: int = 1) -> errors.InvalidInput:
    """A request its handler's arguments could not be parsed from, naming every bad field.

    FastStream validates the body as the handler's model argument: the argument's name leads
    each location and is no field of the request, so ``skip`` leaves it out.
    """
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"][skip:]]
        problems.append(f"{'.'.join(loc) or 'body'}: {err['msg']}")
    return errors.InvalidInput("; ".join(problems))


class _RpcMiddleware(BaseMiddleware):
    """What FastStream does not do for a request: the in-flight bound, ``Mc-Deadline``, logging
    context, the ``{"ok": ...}`` envelope with typed errors, and answers too large for the bus.

    FastStream's core subscriber awaits each message before it takes the next one. Its own
    concurrency (``max_workers``) queues the requests above the bound instead of refusing them,
    and its in-memory queue and task group cost as much as the rest of the request path together
    (docs/benchmarks.md). So this middleware only admits or refuses; an admitted request is
    worked on in a task of its own, which answers it (the routes are ``no_reply``).
    """

    def __init__(self, msg: Any, /, *, context: Any, server: RpcServer) -> None:
        super().__init__(msg, context=context)
        self.server = server

    async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
        server = self.server
        raw: Msg = msg.raw_message
        if not server._admit():
            return await server._answer(raw, server._overloaded())

        async def call() -> Any:
            return await call_next(msg)

        if not raw.reply:
            # Nobody to answer over the bus (FastStream's in-memory test broker, or a plain
            # publish): work inline and hand the answer back to FastStream.
            try:
                return await server._work(raw, msg.headers, call)
            finally:
                server._working -= 1
        server._spawn(server._work(raw, msg.headers, call))
        return None


# The headers of the request being handled, set by the request middleware. The dependencies
# below read them here rather than through FastStream's ``Context``: FastDepends resolves a
# context field with a plain function in a worker thread, a thread hand-off on every request.
# They are coroutines for the same reason.
_request_headers: ContextVar[Mapping[str, str]] = ContextVar("rpc_request_headers")


async def request_meta() -> RequestMeta:
    """Dependency: the :class:`RequestMeta` of the request being handled."""
    return RequestMeta.from_headers(_request_headers.get())


Meta = Annotated[RequestMeta, Depends(request_meta)]
"""A handler argument annotated ``Meta`` receives the request's :class:`RequestMeta`."""


async def request_headers() -> dict[str, str]:
    """Dependency: the request's headers."""
    return dict(_request_headers.get())


Headers = Annotated[dict[str, str], Depends(request_headers)]
"""A handler argument annotated ``Headers`` receives the request's headers."""

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _direct(
    func: Callable[..., Awaitable[Any]],
) -> Callable[[Mapping[str, str], bytes], Awaitable[Any]]:
    """Call a FastStream-style handler without FastStream: ``call(headers, body)``.

    The handler's first argument is the body (a pydantic model, or a plain dict); the others are
    :data:`Meta` or :data:`Headers`.
    """
    hints = get_type_hints(func, include_extras=True)
    names = list(inspect.signature(func).parameters)
    body_type = hints.get(names[0], dict)
    model = body_type if isinstance(body_type, type) and issubclass(body_type, BaseModel) else None
    extras: list[Callable[[Mapping[str, str]], Any]] = []
    for name in names[1:]:
        if hints.get(name) == Meta:
            extras.append(RequestMeta.from_headers)
        elif hints.get(name) == Headers:
            extras.append(dict)
        else:
            raise TypeError(f"{func.__name__}: argument {name!r} is neither Meta nor Headers")

    async def call(headers: Mapping[str, str], data: bytes) -> Any:
        payload = _body(data)
        if model is None:
            return await func(payload, *(extra(headers) for extra in extras))
        try:
            body = model.model_validate(payload)
        except ValidationError as exc:
            raise _invalid_input(exc, skip=0) from None
        return await func(body, *(extra(headers) for extra in extras))

    return call


class RpcServer:
    """Serves ``mc.rpc.<service>.<method>`` subjects in a queue group named after the service.

    The routes are FastStream NATS subscribers on a :class:`~faststream.nats.NatsRouter`
    (:attr:`router`): a handler's arguments are parsed from the JSON body by pydantic, and
    the router is what the AsyncAPI document is generated from (``scripts/gen_asyncapi.py``).
    Register typed handlers with :meth:`handler`, or ``handler(payload, headers)`` ones with
    :meth:`route`.

    Every request runs in its own task; at most ``max_in_flight`` are worked on at once (all routes
    together). A request above the bound is answered ``overloaded`` straight away, and one whose
    ``Mc-Deadline`` has passed is answered ``deadline_exceeded`` without being worked on: the
    caller has given up, so the work would only add load.

    ``telemetry=False`` leaves out the OpenTelemetry middleware (the benchmark measures its share).
    """

    def __init__(
        self,
        nc: NATS,
        service: str,
        *,
        max_in_flight: int | None = None,
        telemetry: bool = True,
    ) -> None:
        self.nc = nc
        self.service = service
        self.telemetry = telemetry
        self.max_in_flight = (
            max_in_flight if max_in_flight is not None else get_settings().rpc_max_in_flight
        )
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        # Router middlewares, not broker ones: they shape what the routes answer, and must not
        # touch the replies a broker's own requests receive. The telemetry middleware comes
        # second so that it runs inside the request's task: its span (a child of the caller's
        # ``traceparent``) lasts as long as the work.
        self.router = NatsRouter(
            prefix=f"{RPC_PREFIX}.{service}.",
            middlewares=(
                partial(_RpcMiddleware, server=self),
                *((NatsTelemetryMiddleware(),) if telemetry else ()),
            ),
        )
        self.hot_router = NatsRouter(prefix=f"{RPC_PREFIX}.{service}.")
        """The routes served on bare nats-py (``hot=True``): described here, never started."""
        self._hot: dict[str, Callable[[Mapping[str, str], bytes], Awaitable[Any]]] = {}
        self._hot_subs: list[Subscription] = []
        self._broker: NatsBroker | None = None
        self._working = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handler_names: set[str] = set()
        # Answers whose parts are being taken: token -> (until, body, part size).
        self._held: dict[str, tuple[float, bytes, int]] = {}
        self._held_bytes = 0
        self.part_subject = f"{RPC_PREFIX}.{service}._part.{uuid.uuid4().hex[:12]}"
        """Where this replica serves the parts of its large answers (subscribed at the first)."""
        self._part_sub: Subscription | None = None
        self._serving = False
        self.refused = 0
        """Requests answered ``overloaded`` since start (for metrics and tests)."""
        self.expired = 0
        """Requests dropped because their deadline had passed on arrival."""
        _servers.add(self)

    @property
    def in_flight(self) -> int:
        """Requests being worked on now."""
        return self._working

    def handler(
        self, method: str, *, description: str | None = None, hot: bool = False
    ) -> Callable[[F], F]:
        """Decorator: serve ``method`` with a FastStream handler.

        Its one model argument is validated from the body (a bad body answers ``invalid_input``
        naming the field); :data:`Meta` and :data:`Headers` arguments receive the request's
        metadata. It returns the result, or raises a project error.

        ``hot=True`` serves the route on a bare nats-py subscription instead, with the same
        parsing, answers and bounds but without FastStream's per-message machinery, which costs
        a request about half a millisecond (docs/benchmarks.md). The route is still described
        by :attr:`hot_router` for the AsyncAPI document.
        """

        def register(func: F) -> F:
            # FastStream names the model it validates a handler's arguments with after the
            # handler: a validation error with that title is the caller's bad request.
            self._handler_names.add(func.__name__)
            router = self.hot_router if hot else self.router
            router.subscriber(
                method,
                queue=self.service,
                decoder=_decode,
                # The request middleware answers: the work runs in a task of its own.
                no_reply=True,
                title=f"{RPC_PREFIX}.{self.service}.{method}",
                description=description or func.__doc__,
            )(func)
            if hot:
                self._hot[method] = _direct(func)
            return func

        return register

    def route(self, method: str, handler: RpcHandler) -> None:
        """Register ``handler(payload, headers) -> result`` for ``method`` (an untyped body)."""

        async def call(body: dict[str, Any], headers: Headers) -> Any:
            return await handler(body, headers)

        call.__name__ = method
        self.handler(method, description=handler.__doc__)(call)

    def broker(self) -> NatsBroker:
        """A FastStream broker on this server's connection, with its routes and middlewares."""
        broker = _SharedConnectionBroker(
            self.nc,
            # Every request is logged by the handlers that need it; FastStream's per-message
            # lines would double them.
            logger=None,
            graceful_timeout=STOP_TIMEOUT_S,
        )
        broker.include_router(self.router)
        return broker

    def routers(self) -> tuple[NatsRouter, ...]:
        """Every route of the server, for the AsyncAPI document."""
        return (self.router, self.hot_router)

    async def start(self) -> None:
        """Subscribe every registered route."""
        self._serving = True
        for method, call in self._hot.items():
            self._hot_subs.append(
                await self.nc.subscribe(
                    rpc_subject(self.service, method), queue=self.service, cb=self._hot_cb(call)
                )
            )
        self._broker = self.broker()
        await self._broker.start()

    async def stop(self) -> None:
        """Stop taking requests, then let those in hand finish (for up to a few seconds)."""
        self._serving = False
        for sub in self._hot_subs:
            await sub.unsubscribe()
        self._hot_subs.clear()
        self._part_sub = None
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT_S)

    def _hot_cb(
        self, call: Callable[[Mapping[str, str], bytes], Awaitable[Any]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            # nats.py awaits this callback before it delivers the subscription's next message,
            # so it only admits or refuses; the work runs in a task of its own.
            if not self._admit():
                await self._answer(msg, self._overloaded())
                return
            headers = msg.headers or {}
            work: Callable[[], Awaitable[Any]]
            if self.telemetry:
                work = partial(self._traced, msg.subject, call, headers, msg.data)
            else:
                work = partial(call, headers, msg.data)
            self._spawn(self._work(msg, headers, work))

        return cb

    async def _traced(
        self,
        subject: str,
        call: Callable[[Mapping[str, str], bytes], Awaitable[Any]],
        headers: Mapping[str, str],
        data: bytes,
    ) -> Any:
        # What FastStream's telemetry middleware does for the other routes: a span of the
        # work, a child of the caller's (its ``traceparent``).
        with _tracer.start_as_current_span(
            f"{subject} process", context=extract_context(headers), kind=SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", subject)
            return await call(headers, data)

    def _admit(self) -> bool:
        """Take a place among the requests in flight, or count a refusal."""
        if self._working >= self.max_in_flight:
            self.refused += 1
            return False
        self._working += 1
        return True

    def _overloaded(self) -> bytes:
        return _error_body(
            errors.Overloaded(
                f"{self.service} is at its limit of {self.max_in_flight} requests "
                "in flight; retry shortly"
            )
        )

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._working -= 1

    async def _work(
        self, raw: Msg, headers: Mapping[str, str], call: Callable[[], Awaitable[Any]]
    ) -> bytes | None:
        """Run one admitted request and answer it (or return the answer when it has no reply)."""
        deadline = headers.get("Mc-Deadline")
        if deadline and deadline.isdigit() and int(deadline) < time.time() * 1000:
            self.expired += 1
            return await self._answer(
                raw,
                _error_body(errors.DeadlineExceeded("the request's deadline passed before it ran")),
            )
        bind_from_headers(headers)
        _request_headers.set(headers)
        try:
            result = await call()
            body = orjson.dumps({"ok": True, "result": result})
        except errors.MissionControlError as exc:
            body = _error_body(exc)
        except ValidationError as exc:
            if exc.title not in self._handler_names:
                # Not the request's parsing but a model the handler built: a bug, not bad input.
                log.exception("rpc.handler_failed", subject=raw.subject)
                body = _internal_body(exc)
            else:
                body = _error_body(_invalid_input(exc))
        except Exception as exc:
            log.exception("rpc.handler_failed", subject=raw.subject)
            body = _internal_body(exc)
        if (
            len(body) > self._room()
            and raw.reply
            and headers.get(CHUNKS_REQUEST_HEADER) == "1"
            and len(body) <= MAX_CHUNKED_BYTES
            and self._serving
        ):
            await self._answer_in_parts(raw, body)
            return None
        return await self._answer(raw, self._fit(body))

    def _room(self) -> int:
        return int(self.nc.max_payload) - _HEADER_ROOM

    async def _answer_in_parts(self, raw: Msg, body: bytes) -> None:
        """Answer with the first part of ``body``; keep the rest for the caller to ask for."""
        room = self._room()
        count = -(-len(body) // room)
        self._drop_expired()
        if self._held_bytes + len(body) > MAX_HELD_BYTES:
            await self._answer(
                raw,
                _error_body(
                    errors.Overloaded(
                        f"{self.service} holds as many large answers as it may; retry shortly"
                    )
                ),
            )
            return
        if self._part_sub is None:
            # Subscribed before the first part is sent: the caller's requests for the others
            # come after it on the bus, so they find the subscription in place.
            self._part_sub = await self.nc.subscribe(
                self.part_subject, queue=self.service, cb=self._serve_part
            )
            self._hot_subs.append(self._part_sub)
        token = uuid.uuid4().hex
        self._held[token] = (time.monotonic() + PART_TTL_S, body, room)
        self._held_bytes += len(body)
        # Freed at its deadline even when no other large answer comes to sweep it: a caller that
        # gave up after the first part would otherwise leave up to MAX_HELD_BYTES in memory.
        asyncio.get_running_loop().call_later(PART_TTL_S, self._release, token)
        headers = {
            CHUNKS_HEADER: str(count),
            CHUNK_TOKEN_HEADER: token,
            CHUNK_SUBJECT_HEADER: self.part_subject,
        }
        try:
            await self.nc.publish(raw.reply, body[:room], headers=headers)
        except Exception:
            log.warning("rpc.reply_failed", subject=raw.subject, parts=count)

    @property
    def held_bytes(self) -> int:
        """The bytes of answers in parts this replica still holds for their callers."""
        return self._held_bytes

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for token in [t for t, (until, _, _) in self._held.items() if until < now]:
            self._release(token)

    def _release(self, token: str) -> None:
        held = self._held.pop(token, None)
        if held is not None:
            self._held_bytes -= len(held[1])

    async def _serve_part(self, msg: Msg) -> None:
        """Answer a request for part ``index`` of a held answer (the last one releases it)."""
        try:
            ask = orjson.loads(msg.data)
            token, index = str(ask["token"]), int(ask["index"])
            if index < 1:
                raise ValueError(index)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            await self._part_answer(msg, b"bad part request", error=True)
            return
        held = self._held.get(token)
        if held is None:
            await self._part_answer(msg, b"the answer's parts are gone; ask again", error=True)
            return
        _, body, room = held
        part = body[index * room : (index + 1) * room]
        if (index + 1) * room >= len(body):
            self._release(token)
        await self._part_answer(msg, part)

    async def _part_answer(self, msg: Msg, data: bytes, *, error: bool = False) -> None:
        if not msg.reply:
            return
        try:
            await self.nc.publish(
                msg.reply, data, headers={PART_ERROR_HEADER: "1"} if error else None
            )
        except Exception:
            log.warning("rpc.reply_failed", subject=msg.subject)

    async def _answer(self, raw: Msg, body: bytes) -> bytes | None:
        if not raw.reply:
            return body
        try:
            await raw.respond(body)
        except Exception:
            # The connection is closing (shutdown, NATS restart): the caller times out and retries.
            log.warning("rpc.reply_failed", subject=raw.subject)
        return None

    def _fit(self, body: bytes) -> bytes:
        if len(body) > self._room():
            # Over the bus's limit the reply would be dropped and the caller would only see a
            # timeout; tell it what happened instead.
            return _error_body(
                errors.TooLarge(
                    f"the answer is {len(body):,} bytes, over the {self.nc.max_payload:,} bytes "
                    "a message may carry and this caller takes no answers in parts; ask for less "
                    "(filters, a smaller limit)"
                )
            )
        return body


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
        chunked: bool = True,
    ) -> Any:
        """Send a request and return its result, or raise the project error it answered with.

        An answer larger than a NATS message comes in parts and is joined here (see the module
        docstring); ``chunked=False`` asks for ``too_large`` instead.
        """
        t = timeout or self.default_timeout
        deadline = time.monotonic() + t
        h = inject_headers(headers)
        h["Mc-Deadline"] = str(int((time.time() + t) * 1000))
        if chunked:
            h[CHUNKS_REQUEST_HEADER] = "1"
        subject = rpc_subject(service, method)
        try:
            msg = await self.nc.request(subject, orjson.dumps(payload), timeout=t, headers=h)
            data = msg.data
            if msg.headers and CHUNKS_HEADER in msg.headers:
                data = await self._rest(msg, deadline)
        except NoRespondersError as exc:
            raise errors.TransientError(f"{service} is not available (no responders)") from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            raise errors.DeadlineExceeded(f"{service}.{method} did not answer within {t}s") from exc
        reply = orjson.loads(data)
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        cls = _ERRORS.get(err.get("code", "internal"), errors.MissionControlError)
        raise cls(err.get("message", "unknown error"))

    async def _rest(self, first: Msg, deadline: float) -> bytes:
        """The whole answer whose first part is ``first``: each next part asked for in turn."""
        headers = first.headers or {}
        count = int(headers[CHUNKS_HEADER])
        token, subject = headers[CHUNK_TOKEN_HEADER], headers[CHUNK_SUBJECT_HEADER]
        parts = [bytes(first.data)]
        for index in range(1, count):
            left = max(deadline - time.monotonic(), 0.001)
            msg = await self.nc.request(
                subject, orjson.dumps({"token": token, "index": index}), timeout=left
            )
            if msg.headers and PART_ERROR_HEADER in msg.headers:
                raise errors.TransientError(msg.data.decode(errors="replace"))
            parts.append(bytes(msg.data))
        return b"".join(parts)
