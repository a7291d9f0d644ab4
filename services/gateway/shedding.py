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

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

AGENT = "agent"
QUERY = "query"
ROUTE_CLASSES = (AGENT, QUERY)
# Whole seconds, as HTTP's Retry-After takes them. One second is long next to an admission
# (milliseconds) and short next to an agent step, so a shed request costs its step little.
RETRY_AFTER_S = 1
SOURCE_GATEWAY = "gateway"
SOURCE_UPSTREAM = "upstream"

# The routes an agent calls around every step: start, admission, step records, finish.
_AGENT_ROUTES = frozenset(
    {
        ("POST", "/v1/runs"),
        ("POST", "/v1/runs/{run_id}/admissions"),
        ("POST", "/v1/runs/{run_id}/steps"),
        ("POST", "/v1/steps:batch"),
        ("POST", "/v1/runs/{run_id}/finish"),
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


def route_class_of(method: str, path: str) -> str:
    """:data:`AGENT` for the routes an agent calls around every step, else :data:`QUERY`."""
    return AGENT if (method, path) in _AGENT_ROUTES else QUERY


class InFlightLimiter:
    """Counts the requests in flight per route class and refuses those above its bound.

    The gateway runs on one event loop, so the counts need no lock: nothing awaits between the
    check and the increment.
    """

    def __init__(self, limits: Mapping[str, int]) -> None:
        for name, limit in limits.items():
            if limit < 1:
                raise ValueError(f"the in-flight bound of {name!r} must be at least 1")
        self.limits = dict(limits)
        self.in_flight = dict.fromkeys(self.limits, 0)

    def try_enter(self, route_class: str) -> bool:
        """Take a place for a request of ``route_class``; ``False`` when the class is full."""
        if self.in_flight[route_class] >= self.limits[route_class]:
            return False
        self.in_flight[route_class] += 1
        return True

    def leave(self, route_class: str) -> None:
        """Give back the place taken by :meth:`try_enter`."""
        self.in_flight[route_class] -= 1


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
            "The in-flight bound of each route class; above it requests are answered 429.",
            ["route_class"],
            registry=registry,
        )
        for name in limiter.limits:
            # Read at scrape time: the request path pays nothing for the gauge.
            in_flight.labels(name).set_function(_reader(limiter, name))
            limit.labels(name).set(limiter.limits[name])

    def route(self, method: str, path: str) -> RouteMetrics:
        """The metrics of one route, with its label values bound once."""
        return RouteMetrics(self, method, path, route_class_of(method, path))


def _reader(limiter: InFlightLimiter, route_class: str) -> Callable[[], float]:
    return lambda: limiter.in_flight[route_class]


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
