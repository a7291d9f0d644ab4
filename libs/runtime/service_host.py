"""The skeleton every service process runs on.

A service is a small object implementing :class:`Service`; :func:`build_app` wraps it in a FastAPI
app that owns the process-wide resources (NATS connection, JetStream context, PostgreSQL pool,
event store, metrics registry) and the three operational endpoints:

* ``GET /healthz``: the process is alive (liveness; never touches a dependency, so a database
  outage does not get every pod restarted).
* ``GET /readyz``: NATS is connected, PostgreSQL answers ``SELECT 1`` and the service says it is
  ready (readiness; the supervisor and Kubernetes route traffic only when this is 200).
* ``GET /metrics``: Prometheus text exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from libs.errors import first_line
from libs.eventbus.consumer import EventConsumer
from libs.eventbus.db import close_pool, open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcServer, rpc_servers
from libs.eventbus.store import EventStore
from libs.observability import configure_logging
from libs.settings import Settings, get_settings

log = structlog.get_logger("service_host")

# A readiness probe that hangs is worse than one that fails: keep every check short.
READY_CHECK_TIMEOUT_S = 2.0
# Bounded so a NATS server that is down during shutdown cannot keep the process alive.
DRAIN_TIMEOUT_S = 5.0


@dataclass
class ServiceContext:
    """Everything a service needs at run time, created once per process by the host."""

    name: str
    settings: Settings
    nc: NATS
    js: JetStreamContext
    pool: AsyncConnectionPool
    store: EventStore
    registry: CollectorRegistry
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    """Background tasks the service started; the host cancels them at shutdown."""

    @classmethod
    def wire(
        cls,
        name: str,
        settings: Settings,
        nc: NATS,
        pool: AsyncConnectionPool,
        registry: CollectorRegistry | None = None,
    ) -> ServiceContext:
        """A context on an open NATS connection and pool (JetStream and store derived)."""
        return cls(
            name=name,
            settings=settings,
            nc=nc,
            js=nc.jetstream(),
            pool=pool,
            store=EventStore(pool),
            registry=registry if registry is not None else CollectorRegistry(),
        )


class Service(Protocol):
    """What a service implements; the host does the rest."""

    name: str

    async def start(self, ctx: ServiceContext) -> None:
        """Start consumers and background work; called once, before the first request."""

    async def stop(self) -> None:
        """Stop work started by :meth:`start`; called at shutdown, also after a failed start."""

    def router(self) -> APIRouter | None:
        """The service's HTTP routes, or ``None`` when it has no API of its own."""

    def ready(self) -> bool:
        """Whether the service itself can serve (its own state loaded, consumers running)."""


def new_registry() -> CollectorRegistry:
    """A metrics registry pre-loaded with the standard process, platform and GC collectors, and
    the load shedding of the process's RPC servers."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(RpcServerCollector())
    return registry


class RpcServerCollector(Collector):
    """In-flight requests, refusals and expired requests of every RPC server in the process."""

    def collect(self) -> Iterator[Metric]:
        """One sample per server and metric, read at scrape time."""
        in_flight = GaugeMetricFamily(
            "mc_rpc_in_flight", "Requests the service is working on now.", labels=["service"]
        )
        limit = GaugeMetricFamily(
            "mc_rpc_in_flight_limit",
            "The service's bound of requests in flight (MC_RPC_MAX_IN_FLIGHT).",
            labels=["service"],
        )
        refused = CounterMetricFamily(
            "mc_rpc_refused",
            "Requests answered overloaded at once because the service was at its bound.",
            labels=["service"],
        )
        expired = CounterMetricFamily(
            "mc_rpc_expired",
            "Requests answered deadline_exceeded without work: their deadline had passed.",
            labels=["service"],
        )
        # Summed per service name: a process may hold more than one server of a service.
        totals: dict[str, list[int]] = {}
        for server in rpc_servers():
            t = totals.setdefault(server.service, [0, 0, 0, 0])
            t[0] += server.in_flight
            t[1] = max(t[1], server.max_in_flight)
            t[2] += server.refused
            t[3] += server.expired
        for service, (now, bound, refusals, expirations) in sorted(totals.items()):
            in_flight.add_metric([service], now)
            limit.add_metric([service], bound)
            refused.add_metric([service], refusals)
            expired.add_metric([service], expirations)
        yield from (in_flight, limit, refused, expired)


def build_app(
    service: Service, settings: Settings, registry: CollectorRegistry | None = None
) -> FastAPI:
    """The FastAPI app of one service process (see the module docstring for its routes).

    ``registry`` is the one ``/metrics`` serves (a new :func:`new_registry` when not given); a
    service whose routes record metrics creates it first and registers them in it.
    """
    # Created here rather than in the lifespan so /metrics works even in tests that skip it.
    registry = registry if registry is not None else new_registry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect(settings.nats_url, service.name, settings.nats_credentials())
        pool: AsyncConnectionPool | None = None
        try:
            js = nc.jetstream()
            await ensure_streams(js, update=False)
            pool = await open_pool(settings.database_url.get_secret_value())
            ctx = ServiceContext.wire(service.name, settings, nc, pool, registry)
            app.state.ctx = ctx
            try:
                await service.start(ctx)
                log.info("service.started", service=service.name)
                yield
            finally:
                try:
                    await service.stop()
                except Exception:
                    log.exception("service.stop_failed", service=service.name)
                await _cancel_all(ctx.tasks)
        finally:
            # Drain before closing the pool: handlers still finishing may need the database.
            await _drain(nc)
            if pool is not None:
                await close_pool(pool)
            log.info("service.stopped", service=service.name)

    app = FastAPI(
        title=f"Mission Control {service.name}", lifespan=lifespan, **_framework_options()
    )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ctx: ServiceContext | None = getattr(app.state, "ctx", None)
        problems: dict[str, str] = {}
        if ctx is None:
            problems["startup"] = "not started"
        else:
            if not ctx.nc.is_connected:
                problems["nats"] = "not connected"
            db_problem = await _check_database(ctx.pool)
            if db_problem:
                problems["database"] = db_problem
            try:
                if not service.ready():
                    problems["service"] = f"{service.name} is not ready"
            except Exception as exc:
                problems["service"] = f"readiness check failed: {exc}"
        if problems:
            return JSONResponse(
                {"status": "not_ready", "not_ready": sorted(problems), "detail": problems},
                status_code=503,
            )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    router = service.router()
    if router is not None:
        app.include_router(router)
    return app


def _framework_options() -> dict[str, Any]:
    """FastAPI options every service app is built with.

    FastAPI 0.165+ makes a server span (and one per operation) for every request as soon as a
    tracer provider is set. The services make their own: the gateway's route span, carried on in
    the RPC trace headers. The framework's pair doubled that and cost the gateway about 0.6 ms a
    request (a third of its work per admission, and most of the cost of refusing one), so it is
    turned off where the option exists.
    """
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


async def _check_database(pool: AsyncConnectionPool) -> str | None:
    """``None`` when ``SELECT 1`` succeeds within the timeout, else what went wrong."""
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            async with pool.connection(timeout=READY_CHECK_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")
    except TimeoutError:
        return f"SELECT 1 did not answer within {READY_CHECK_TIMEOUT_S}s"
    except Exception as exc:
        return first_line(exc)
    return None


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(nc: NATS) -> None:
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
    except Exception:
        # Draining needs a live server; without one, just drop the connection.
        with contextlib.suppress(Exception):
            await nc.close()


def run_service(service: Service) -> None:
    """Run ``service`` under uvicorn until SIGTERM/SIGINT (uvicorn shuts down gracefully)."""
    settings = get_settings()
    configure_logging(service.name, settings.log_level)
    uvicorn.run(
        build_app(service, settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


# The consumer notices a stop request within its 1 s fetch timeout; wait a little longer.
CONSUMER_STOP_TIMEOUT_S = 5.0


class ConsumerRpcService:
    """Base of the services made of one event consumer plus NATS request routes.

    Subclasses set ``name`` and implement :meth:`wire`, which builds their handlers and returns
    the consumer and the (not yet started) RPC server; starting, stopping and readiness are the
    same for all of them.
    """

    name: str

    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None
        self.consumer: EventConsumer | None = None
        self.rpc: RpcServer | None = None
        self._task: asyncio.Task[None] | None = None

    def wire(self, ctx: ServiceContext) -> tuple[EventConsumer, RpcServer]:
        """Build the handlers; return the consumer and the RPC server to run."""
        raise NotImplementedError

    async def start(self, ctx: ServiceContext) -> None:
        """Start the consumer in the background and serve the RPC routes."""
        self.ctx = ctx
        self.consumer, self.rpc = self.wire(ctx)
        self._task = asyncio.create_task(self.consumer.run(), name=f"{self.name}-consumer")
        ctx.tasks.append(self._task)
        await self.rpc.start()

    async def stop(self) -> None:
        """Stop answering requests, then let the consumer finish the message in hand."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.consumer is not None:
            self.consumer.stop()
        if self._task is not None and not self._task.done():
            # asyncio.wait never raises: a task still running after the timeout is cancelled
            # by the host with the rest of ctx.tasks.
            await asyncio.wait({self._task}, timeout=CONSUMER_STOP_TIMEOUT_S)

    def router(self) -> APIRouter | None:
        """No HTTP routes of its own: requests arrive over NATS."""
        return None

    def ready(self) -> bool:
        """Ready once the routes are subscribed and the consumer is fetching."""
        return (
            self.rpc is not None
            and self.consumer is not None
            and self.consumer.running
            and self._task is not None
            and not self._task.done()
        )
