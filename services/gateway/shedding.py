"""Load shedding and request metrics of the gateway's ``/v1`` routes.

The gateway bounds the requests it works on at once per route class: the agent hot path (start a
run, ask admission, record steps, finish) and everything else (queries, incidents, prices,
admin), so a burst of slow queries cannot take the admission path's capacity and the other way
round. Above its class's bound a request is answered ``429`` with ``Retry-After`` straight away,
before authentication or reading the body: an agent learns within a round trip that it should
back off, instead of waiting seconds in a queue that only grows.

Metrics are labelled by route *template* (``/v1/runs/{run_id}/admissions``), never by the raw
path, so the number of series stays fixed however many runs there are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

AGENT = "agent"
QUERY = "query"
STREAM = "stream"
"""Long-lived event streams (SSE): bounded by their own count (``services.gateway.live``), not
by the in-flight bounds, which they would hold for minutes."""
ROUTE_CLASSES = (AGENT, QUERY)
# Whole seconds, as HTTP's Retry-After takes them. One second is long next to an admission
# (milliseconds) and short next to an agent step, so a shed request costs its step little.
RETRY_AFTER_S = 1
SOURCE_GATEWAY = "gateway"
SOURCE_UPSTREAM = "upstream"
# The adaptive bound never goes below this (a few requests always get through to measure by)
# and shrinks to this fraction of itself when requests come back late.
MIN_LIMIT = 2
DECREASE = 0.8
MAX_DECREASE = 0.5
# Weight of the newest answer time in the moving average the bound adapts to.
SMOOTHING = 0.2

# The routes an agent calls around every step: start, admission, step records, finish.
_AGENT_ROUTES = frozenset(
    {
        ("POST", "/v1/runs"),
        ("POST", "/v1/runs/{run_id}/admissions"),
        ("POST", "/v1/runs/{run_id}/steps"),
        ("POST", "/v1/steps:batch"),
        ("POST", "/v1/runs/{run_id}/finish"),
        ("POST", "/v1/runs/{run_id}/steps/{step_index}/usage"),
    }
)

# From well under the admission path's p50 to past the gateway's slowest RPC deadline.
_LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)


def route_class_of(method: str, path: str, *, stream: bool = False) -> str:
    """:data:`STREAM` for a route that answers an event stream (``stream``: the caller reads it
    off the route, see :func:`services.gateway.middleware.answers_event_stream`), :data:`AGENT`
    for the routes an agent calls around every step, else :data:`QUERY`."""
    if stream:
        return STREAM
    return AGENT if (method, path) in _AGENT_ROUTES else QUERY


class InFlightLimiter:
    """Counts the requests in flight per route class and refuses those above its bound.

    A class with a latency target has an adaptive bound below its configured one (additive
    increase, multiplicative decrease, as TCP does for its window): while the moving (geometric)
    average of its answer times is above the target the bound shrinks by a fifth (by up to half
    when the average is far above the target), at most once per target interval, down to
    :data:`MIN_LIMIT`; each request answered within the target lets it grow back by about one
    per bound's worth of answers. By Little's law, requests in flight divided by throughput is
    the time each one waits, so a fixed bound turns into seconds of waiting as soon as the
    system behind slows down (a busy machine, a slow database); the adaptive bound keeps the
    admitted requests near the target and refuses the rest at once.

    The gateway runs on one event loop, so the counts need no lock: nothing awaits between the
    check and the increment.
    """

    def __init__(
        self,
        limits: Mapping[str, int],
        targets: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, limit in limits.items():
            if limit < 1:
                raise ValueError(f"the in-flight bound of {name!r} must be at least 1")
        self.limits = dict(limits)
        self.targets = dict(targets or {})
        self.clock = clock
        self.in_flight = dict.fromkeys(self.limits, 0)
        self.bound: dict[str, float] = {name: float(limit) for name, limit in self.limits.items()}
        # Exponentially weighted moving average of the logarithm of each class's answer times.
        self._log_latency = dict.fromkeys(self.limits, math.log(1e-3))
        self._last_cut = dict.fromkeys(self.limits, -float("inf"))

    def try_enter(self, route_class: str) -> bool:
        """Take a place for a request of ``route_class``; ``False`` when the class is full."""
        if self.in_flight[route_class] >= int(self.bound[route_class]):
            return False
        self.in_flight[route_class] += 1
        return True

    def leave(self, route_class: str, seconds: float = 0.0) -> None:
        """Give back the place taken by :meth:`try_enter`; the request took ``seconds``."""
        self.in_flight[route_class] -= 1
        target = self.targets.get(route_class)
        if target is None:
            return
        bound = self.bound[route_class]
        # One slow answer is noise on a busy machine; a moving average of them is a trend. The
        # average is geometric (of the logarithms): a single answer ten times slower than the
        # rest moves it by a factor of 10**SMOOTHING, not by a fifth of that answer's time.
        log_latency = self._log_latency[route_class]
        log_latency += SMOOTHING * (math.log(max(seconds, 1e-6)) - log_latency)
        self._log_latency[route_class] = log_latency
        latency = math.exp(log_latency)
        if latency > target:
            now = self.clock()
            # One cut per target interval: the requests already in flight when the system
            # slowed down all come back late, and should not each cut the bound again.
            if now - self._last_cut[route_class] >= target:
                # Far over the target (a sudden flood) cuts deeper, down to half at once, so the
                # bound reaches its new level within a few intervals rather than seconds.
                factor = max(MAX_DECREASE, min(DECREASE, target / latency))
                self.bound[route_class] = max(float(MIN_LIMIT), bound * factor)
                self._last_cut[route_class] = now
        elif seconds <= target and bound < self.limits[route_class]:
            self.bound[route_class] = min(float(self.limits[route_class]), bound + 1.0 / bound)


class GatewayMetrics:
    """The gateway's request metrics, registered in the service's registry."""

    def __init__(self, registry: CollectorRegistry, limiter: InFlightLimiter) -> None:
        self.requests = Counter(
            "mc_gateway_requests_total",
            "API requests answered, by method, route template and status class.",
            ["method", "route", "status_class"],
            registry=registry,
        )
        self.latency = Histogram(
            "mc_gateway_request_duration_seconds",
            "Time from a request reaching its route to its answer, by route template and status "
            "class.",
            ["method", "route", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.shed = Counter(
            "mc_gateway_shed_total",
            "Requests answered 429: refused by the gateway's own in-flight bound (source "
            "gateway) or by an overloaded service behind it (source upstream).",
            ["route_class", "source"],
            registry=registry,
        )
        in_flight = Gauge(
            "mc_gateway_in_flight",
            "API requests being worked on now, by route class.",
            ["route_class"],
            registry=registry,
        )
        limit = Gauge(
            "mc_gateway_in_flight_limit",
            "The in-flight bound of each route class now (adaptive below the configured one); "
            "above it requests are answered 429.",
            ["route_class"],
            registry=registry,
        )
        for name in limiter.limits:
            # Read at scrape time: the request path pays nothing for the gauges.
            in_flight.labels(name).set_function(_reader(limiter.in_flight, name))
            limit.labels(name).set_function(_reader(limiter.bound, name))

    def route(self, method: str, path: str, *, stream: bool = False) -> RouteMetrics:
        """The metrics of one route, with its label values bound once."""
        return RouteMetrics(self, method, path, route_class_of(method, path, stream=stream))


def _reader(values: Mapping[str, float], route_class: str) -> Callable[[], float]:
    return lambda: int(values[route_class])


class RouteMetrics:
    """One route's children of :class:`GatewayMetrics`, looked up once per status class."""

    def __init__(self, metrics: GatewayMetrics, method: str, path: str, route_class: str) -> None:
        self.metrics = metrics
        self.method = method
        self.path = path
        self.route_class = route_class
        self._children: dict[int, tuple[Counter, Histogram]] = {}

    def observe(self, status: int, seconds: float, *, shed: str | None = None) -> None:
        """Count an answer with ``status`` after ``seconds``; ``shed`` names who refused a 429."""
        status_class = status // 100
        children = self._children.get(status_class)
        if children is None:
            labels = (self.method, self.path, f"{status_class}xx")
            children = (
                self.metrics.requests.labels(*labels),
                self.metrics.latency.labels(*labels),
            )
            self._children[status_class] = children
        children[0].inc()
        children[1].observe(seconds)
        if shed is not None:
            self.metrics.shed.labels(self.route_class, shed).inc()
