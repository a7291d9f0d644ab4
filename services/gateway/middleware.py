"""The gateway's load shedding, rate limits and request metrics, as ASGI middleware in front of
the routes.

It runs before routing, dependency injection and body parsing, so refusing a request above its
class's bound costs a path match and one small answer: under a flood the gateway spends its CPU
on the requests it admits, not on turning the others away. Requests it admits are timed and
counted by route template when they finish, whatever answers them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry, Counter
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.errors import Overloaded
from services.gateway.entrypoints import CORRELATION_HEADER, correlation_id_from
from services.gateway.keys import KeyVerifier
from services.gateway.live import MEDIA_TYPE as EVENT_STREAM_MEDIA_TYPE
from services.gateway.ratelimit import RATE_LIMITED, RateLimiter
from services.gateway.shedding import (
    RETRY_AFTER_S,
    SOURCE_GATEWAY,
    SOURCE_UPSTREAM,
    STREAM,
    GatewayMetrics,
    InFlightLimiter,
    RouteMetrics,
)

API_PREFIX = "/v1/"
# Set in the ASGI scope of a request a rate limit refused, so the load shedding's metrics do not
# count it as shed.
RATE_LIMITED_KEY = "mc.rate_limited"
_CORRELATION_KEY = CORRELATION_HEADER.lower().encode()


def answers_event_stream(route: BaseRoute) -> bool:
    """Whether the route's documented answer is Server-Sent Events.

    Such a request stays open for as long as its client follows it, so it is bounded by the
    count of open streams (:class:`services.gateway.live.StreamSlots`), never by the in-flight
    bound of short requests: counted there, 16 open consoles would hold every query place and
    the gateway would refuse all other reads. Read off the route's own declaration, so a new
    stream route cannot be forgotten in a list.
    """
    responses = getattr(route, "responses", None) or {}
    ok = responses.get(200) or responses.get("200") or {}
    return EVENT_STREAM_MEDIA_TYPE in (ok.get("content") or {})


@dataclass(frozen=True)
class _Template:
    regex: re.Pattern[str]
    methods: frozenset[str]
    metrics: RouteMetrics


class LoadShedding:
    """Bounds the ``/v1`` requests in flight per route class and measures every one of them.

    ``routes`` gives the app's routes; they are read once, at the first request, when every
    router has been included.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: InFlightLimiter,
        metrics: GatewayMetrics,
        routes: Callable[[], Sequence[BaseRoute]],
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.metrics = metrics
        self._routes = routes
        self._templates: list[_Template] | None = None
        self._refusals = {
            name: orjson.dumps(
                {
                    "error": {
                        "code": Overloaded.code,
                        "message": f"the gateway is at its limit of {limit} {name} requests in "
                        f"flight; retry after {RETRY_AFTER_S}s",
                    }
                }
            )
            for name, limit in limiter.limits.items()
        }

    def _match(self, method: str, path: str) -> RouteMetrics | None:
        if self._templates is None:
            self._templates = [
                _Template(
                    r.path_regex,
                    frozenset(r.methods or ()),
                    self.metrics.route(m, r.path, stream=answers_event_stream(r)),
                )
                for r in self._routes()
                if isinstance(r, Route) and r.path.startswith(API_PREFIX)
                for m in sorted(r.methods or ())
            ]
        for t in self._templates:
            if method in t.methods and t.regex.match(path):
                return t.metrics
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        route = self._match(scope["method"], scope["path"])
        if route is None:
            # Unknown path or method: the app answers 404/405; not a route, so not a series.
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route_class = route.route_class
        if route_class == STREAM:  # bounded by its own count of open streams
            await self.app(scope, receive, send)
            return
        if not self.limiter.try_enter(route_class):
            await self._refuse(scope, send, route_class)
            route.observe(429, time.perf_counter() - started, shed=SOURCE_GATEWAY)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            self.limiter.leave(route_class, seconds)
            # A rate limit's 429 is the caller's budget, not load: it is counted apart.
            shed = status == 429 and not scope.get(RATE_LIMITED_KEY)
            route.observe(status, seconds, shed=SOURCE_UPSTREAM if shed else None)

    async def _refuse(self, scope: Scope, send: Send, route_class: str) -> None:
        await too_many_requests(scope, send, self._refusals[route_class], RETRY_AFTER_S)


async def too_many_requests(scope: Scope, send: Send, body: bytes, retry_after_s: int) -> None:
    """Answer ``429`` with ``Retry-After``, the error ``body`` and the request's correlation id."""
    given = next((v for k, v in scope["headers"] if k == _CORRELATION_KEY), b"")
    correlation_id = correlation_id_from(given.decode("latin-1"))
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after_s).encode()),
                (_CORRELATION_KEY, correlation_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RateLimiting:
    """Token buckets per API key and per tenant in front of the ``/v1`` routes.

    The presented key is verified here (the verifier's cache makes that one hash): a bucket is
    spent only for a key that proved itself, so nobody can drain another key's or tenant's
    budget by naming its key id. Requests without a valid key pass on, and the route answers
    them 401 as before. Over a limit, the answer is ``429`` with ``Retry-After`` and the usual
    error body, code ``rate_limited``, naming the limit (see :mod:`services.gateway.ratelimit`).
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        keys: Callable[[], KeyVerifier],
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.keys = keys
        self.clock = clock
        self.refused = Counter(
            "mc_gateway_rate_limited",
            "Requests refused (429) by a rate limit, by the limit that refused them.",
            ["limit"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        token = _presented_key(scope["headers"])
        principal = None
        # API keys only: people's tokens are not rate limited (a person is not a hot path).
        if token and token.startswith("mc_"):
            try:
                principal = await self.keys().verify(token)
            except Exception:  # the route answers it (401, or 503 while the store is away)
                principal = None
        if principal is not None:
            refusal = self.limiter.take(principal.tenant_id, principal.key_id, self.clock())
            if refusal is not None:
                scope[RATE_LIMITED_KEY] = True
                self.refused.labels(refusal.scope).inc()
                body = orjson.dumps({"error": {"code": RATE_LIMITED, "message": refusal.message}})
                await too_many_requests(scope, send, body, refusal.retry_after_s)
                return
        await self.app(scope, receive, send)


def _presented_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The API key of ``Authorization: Bearer`` or else ``X-API-Key``, as the routes read it."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = credentials.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key
