"""The gateway's in-flight bounds and route classes, and its metrics' labels."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.routing import Route

from libs.settings import Settings
from services.gateway.bootstrap import create_app
from services.gateway.middleware import LoadShedding, answers_event_stream
from services.gateway.shedding import (
    AGENT,
    MIN_LIMIT,
    QUERY,
    STREAM,
    GatewayMetrics,
    InFlightLimiter,
    route_class_of,
)


def test_the_agent_hot_path_is_its_own_class() -> None:
    assert route_class_of("POST", "/v1/runs/{run_id}/admissions") == AGENT
    assert route_class_of("POST", "/v1/steps:batch") == AGENT
    assert route_class_of("POST", "/v1/runs") == AGENT
    assert route_class_of("GET", "/v1/runs") == QUERY
    assert route_class_of("GET", "/v1/runs/{run_id}/trace") == QUERY
    assert route_class_of("POST", "/v1/incidents/{incident_id}/acknowledge") == QUERY


def test_a_class_refuses_above_its_bound_and_frees_places() -> None:
    limiter = InFlightLimiter({AGENT: 2, QUERY: 1})
    assert limiter.try_enter(AGENT) and limiter.try_enter(AGENT)
    assert not limiter.try_enter(AGENT)
    # The other class is not affected by a full one.
    assert limiter.try_enter(QUERY)
    assert not limiter.try_enter(QUERY)
    limiter.leave(AGENT)
    assert limiter.try_enter(AGENT)
    assert limiter.in_flight == {AGENT: 2, QUERY: 1}


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InFlightLimiter({AGENT: 0})


def test_metrics_are_labelled_by_route_template_and_status_class() -> None:
    registry = CollectorRegistry()
    limiter = InFlightLimiter({AGENT: 3, QUERY: 1})
    metrics = GatewayMetrics(registry, limiter)
    route = metrics.route("POST", "/v1/runs/{run_id}/admissions")
    route.observe(200, 0.002)
    route.observe(429, 0.0001, shed="gateway")
    assert limiter.try_enter(AGENT)
    text = generate_latest(registry).decode()
    labels = 'method="POST",route="/v1/runs/{run_id}/admissions"'
    assert f'mc_gateway_requests_total{{{labels},status_class="2xx"}} 1.0' in text
    assert f'mc_gateway_requests_total{{{labels},status_class="4xx"}} 1.0' in text
    assert 'mc_gateway_shed_total{route_class="agent",source="gateway"} 1.0' in text
    assert 'mc_gateway_in_flight{route_class="agent"} 1.0' in text
    assert 'mc_gateway_in_flight_limit{route_class="agent"} 3.0' in text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _answer(limiter: InFlightLimiter, seconds: float) -> None:
    assert limiter.try_enter(AGENT)
    limiter.leave(AGENT, seconds)


def test_one_late_answer_among_timely_ones_does_not_shrink_the_bound() -> None:
    limiter = InFlightLimiter({AGENT: 50}, targets={AGENT: 0.1}, clock=Clock())
    for _ in range(20):
        _answer(limiter, 0.01)
    _answer(limiter, 1.0)
    assert limiter.bound[AGENT] == 50


def test_late_answers_shrink_the_bound_once_per_interval_and_timely_ones_regrow_it() -> None:
    clock = Clock()
    limiter = InFlightLimiter({AGENT: 50, QUERY: 5}, targets={AGENT: 0.1}, clock=clock)
    while limiter.bound[AGENT] == 50:
        _answer(limiter, 0.5)
    first = limiter.bound[AGENT]
    # A cut takes at most half, however late the answers.
    assert 25 <= first < 50
    # More late answers within the same interval (already in flight) cut nothing more.
    for _ in range(5):
        _answer(limiter, 0.5)
    assert limiter.bound[AGENT] == first
    clock.now += 0.1
    _answer(limiter, 0.5)
    assert first / 2 <= limiter.bound[AGENT] < first
    for _ in range(30):
        clock.now += 0.1
        _answer(limiter, 0.5)
    assert limiter.bound[AGENT] == MIN_LIMIT
    # Above the bound a request is refused, whatever the configured one.
    assert limiter.try_enter(AGENT) and limiter.try_enter(AGENT)
    assert not limiter.try_enter(AGENT)
    limiter.leave(AGENT, 0.01)
    limiter.leave(AGENT, 0.01)
    for _ in range(2000):
        _answer(limiter, 0.01)
    assert limiter.bound[AGENT] == 50


def test_a_class_without_a_target_keeps_its_bound() -> None:
    limiter = InFlightLimiter({AGENT: 3, QUERY: 3}, targets={AGENT: 0.1})
    assert limiter.try_enter(QUERY)
    limiter.leave(QUERY, 600.0)
    assert limiter.bound[QUERY] == 3


def test_every_event_stream_route_is_bounded_by_open_streams_not_by_query_places() -> None:
    """A stream held open by a console must not take one of the few in-flight places of short
    requests; the class is read off each route's declared answer, so no stream is missed."""
    app = create_app(Settings())
    spec = app.openapi()
    streams = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if "text/event-stream" in op.get("responses", {}).get("200", {}).get("content", {})
    }
    assert {
        ("GET", "/v1/live"),
        ("GET", "/v1/runs/{run_id}/events"),
        ("GET", "/v1/executions/{execution_id}/events"),
    } <= streams
    # The routes the load shedding reads, as it reads them.
    shedding = next(m for m in app.user_middleware if m.cls is LoadShedding)
    routes = [r for r in shedding.kwargs["routes"]() if isinstance(r, Route)]
    classified = {
        (method, route.path)
        for route in routes
        if answers_event_stream(route)
        for method in route.methods or ()
    }
    assert classified == streams
    for method, path in streams:
        assert route_class_of(method, path, stream=True) == STREAM
    runs = next(r for r in routes if r.path == "/v1/runs" and "GET" in (r.methods or ()))
    assert not answers_event_stream(runs)
