"""Wiring of the gateway service into the shared service host."""

from __future__ import annotations

import asyncio

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from libs.errors import TransientError
from libs.eventbus.rpc import RpcClient
from libs.observability import configure_logging
from libs.runtime.service_host import ServiceContext, build_app, new_registry
from libs.settings import Settings, get_settings
from services.gateway.auth import Authenticator
from services.gateway.console import mount_console
from services.gateway.entrypoints import build_router, build_well_known_router, map_exception
from services.gateway.keys import REVOKED_CHANNEL, KeyVerifier, follow_notifications
from services.gateway.middleware import LoadShedding, RateLimiting
from services.gateway.ratelimit import Limit, RateLimiter, parse_overrides
from services.gateway.shedding import AGENT, QUERY, GatewayMetrics, InFlightLimiter
from services.gateway.tokens import SigningKey, signing_key_path, verifier_for
from services.gateway.users import USER_CHANNEL, UserDirectory

API_TITLE = "Mission Control API"
API_VERSION = "1.0.0"
API_DESCRIPTION = (
    "Govern and observe AI-agent runs: ask admission before every step, record steps, and read "
    "runs, traces, incidents, policies and costs. Agents authenticate with an API key "
    "(`Authorization: Bearer mc_...` or `X-API-Key: mc_...`), issued by `mctl tenant create`, "
    "whose scopes (`ingest`, `admit`, `read`) bound what it may do; people with a bearer token "
    "from `POST /v1/auth/token` or the configured OIDC provider, and their role in the tenant "
    "(viewer, operator, approver, admin) bounds what they may do. Each route names the permission "
    "it needs; 403 says which role or scope is missing.\n\n"
    "The gateway refuses work above its bound of requests in flight, and passes on the refusals "
    "of the services behind it, with `429 Too Many Requests` and a `Retry-After` header at once "
    "rather than queueing: back off for that many seconds and retry. Each API key and each "
    "tenant also has a rate limit (a token bucket): above it the answer is the same `429` with "
    "`Retry-After`, error code `rate_limited`, naming the limit."
)


class GatewayService:
    """The public HTTP API: authenticates API keys and people's tokens, checks each route's
    permission, and forwards each request to its service."""

    name: str = "gateway"

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.ctx: ServiceContext | None = None
        self._rpc: RpcClient | None = None
        self._auth: Authenticator | None = None
        self._router: APIRouter | None = None
        # The agent hot path adapts its bound to keep admissions near the latency target;
        # queries (exports, rebuilds) may legitimately take long, so theirs stays fixed.
        self.limiter = InFlightLimiter(
            {
                AGENT: settings.gateway_max_in_flight_agent,
                QUERY: settings.gateway_max_in_flight_query,
            },
            targets={AGENT: settings.gateway_latency_target_ms / 1000},
        )
        self.metrics = GatewayMetrics(registry, self.limiter)

    async def start(self, ctx: ServiceContext) -> None:
        """Create the RPC client on the host's NATS connection and the authenticator (its signing
        key made at first start), and follow key revocations and user changes."""
        self.ctx = ctx
        self._rpc = RpcClient(ctx.nc)
        settings = ctx.settings
        signer = SigningKey.load_or_create(signing_key_path(settings))
        keys, users = KeyVerifier(ctx.pool), UserDirectory(ctx.pool)
        self._auth = Authenticator(
            keys, verifier_for(settings, signer), users, signer, settings.auth_token_ttl_s
        )

        def forget_all() -> None:
            keys.forget_all()
            users.forget_all()

        # Cancelled by the host with the rest of ctx.tasks.
        ctx.tasks.append(
            asyncio.create_task(
                follow_notifications(
                    settings.database_url.get_secret_value(),
                    {REVOKED_CHANNEL: keys.forget, USER_CHANNEL: users.forget},
                    forget_all,
                    keys.set_listening,
                ),
                name="gateway-revocations",
            )
        )

    async def stop(self) -> None:
        """Nothing of its own to stop: the host drains NATS and closes the pool."""
        self._rpc = None
        self._auth = None

    def router(self) -> APIRouter:
        """The API (built once)."""
        if self._router is None:
            self._router = build_router(self.rpc_client, self.authenticator)
        return self._router

    def ready(self) -> bool:
        """Ready once started."""
        return self._rpc is not None and self._auth is not None

    def rpc_client(self) -> RpcClient:
        """The RPC client (only while started)."""
        if self._rpc is None:
            raise TransientError("the gateway is not started")
        return self._rpc

    def authenticator(self) -> Authenticator:
        """The authenticator of keys and tokens (only while started)."""
        if self._auth is None:
            raise TransientError("the gateway is not started")
        return self._auth

    def key_verifier(self) -> KeyVerifier:
        """The API-key verifier the rate limits identify keys with (only while started)."""
        return self.authenticator().keys


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's FastAPI app: the host's app plus the public API's OpenAPI identity.

    The security schemes (bearer and ``X-API-Key``) come from the routes' dependencies; the
    title, version and description are set here because the host names apps after the service.
    """
    settings = settings or get_settings()
    registry = new_registry()
    service = GatewayService(settings, registry)
    app = build_app(service, settings, registry)
    # Inside the load shedding (added first, so it runs after it): a request refused for load
    # costs no key verification, and a rate-limited one holds no place in flight for long.
    app.add_middleware(
        RateLimiting,
        limiter=RateLimiter(
            Limit(settings.rate_limit_key_rps, settings.rate_limit_key_burst),
            Limit(settings.rate_limit_tenant_rps, settings.rate_limit_tenant_burst),
            parse_overrides(settings.rate_limit_tenants),
        ),
        keys=service.key_verifier,
        registry=registry,
    )
    app.add_middleware(
        LoadShedding,
        limiter=service.limiter,
        metrics=service.metrics,
        routes=lambda: service.router().routes,
    )

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths (404), wrong methods (405) and the like never reach a /v1 route's own
        # error mapping; answer them in the same {"error": {code, message}} shape.
        return map_exception(exc)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(build_well_known_router(service.authenticator))
    mount_console(app)
    app.title = API_TITLE
    app.version = API_VERSION
    app.description = API_DESCRIPTION
    return app


# How long the gateway keeps an idle client connection open. Longer than the SDK's own
# keep-alive (services/gateway/client.py, KEEPALIVE_EXPIRY_S), so a client never sends on a
# connection the gateway is closing; uvicorn's default (5 s) equals httpx's.
KEEP_ALIVE_S = 60


def main() -> None:
    """Run the gateway until SIGTERM: :func:`run_service`, but serving :func:`create_app`."""
    settings = get_settings()
    configure_logging(GatewayService.name, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
