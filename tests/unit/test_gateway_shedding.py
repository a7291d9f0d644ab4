"""The gateway's in-flight bounds and route classes, and its metrics' labels."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.gateway.shedding import (
    AGENT,
    QUERY,
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
