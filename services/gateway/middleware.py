"""The gateway's load shedding and request metrics, as ASGI middleware in front of the routes.

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
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.errors import Overloaded
from services.gateway.entrypoints import CORRELATION_HEADER, correlation_id_from
from services.gateway.shedding import (
    RETRY_AFTER_S,
    SOURCE_GATEWAY,
    SOURCE_UPSTREAM,
    GatewayMetrics,
    InFlightLimiter,
    RouteMetrics,
)

API_PREFIX = "/v1/"
_CORRELATION_KEY = CORRELATION_HEADER.lower().encode()


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
                _Template(r.path_regex, frozenset(r.methods or ()), self.metrics.route(m, r.path))
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
            route.observe(status, seconds, shed=SOURCE_UPSTREAM if status == 429 else None)

    async def _refuse(self, scope: Scope, send: Send, route_class: str) -> None:
        given = next((v for k, v in scope["headers"] if k == _CORRELATION_KEY), b"")
        correlation_id = correlation_id_from(given.decode("latin-1"))
        body = self._refusals[route_class]
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                    (_CORRELATION_KEY, correlation_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
