"""Wiring of the audit-replay service into the shared service host."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from fastapi import APIRouter

from libs.eventbus.rpc import RpcServer
from libs.evidence_signing import evidence_signing_key
from libs.runtime.service_host import ServiceContext, run_service
from libs.settings import Settings
from services.audit_replay.answers import AnswerCache
from services.audit_replay.clickhouse import Clickhouse, open_clickhouse
from services.audit_replay.entrypoints import AuditQueries, rpc_server
from services.audit_replay.evidence_queries import EvidenceQueries
from services.audit_replay.handlers import LagMonitor, ProjectionConsumer, Projector
from services.audit_replay.lanes import LANES

log = structlog.get_logger("audit")


class AuditReplayService:
    """Projects every event into ClickHouse and answers audit queries over NATS.

    Ready once the ClickHouse schema exists, the consumers of both lanes (control and bulk) are
    running and the RPC routes are subscribed.
    """

    name: str = "audit-replay"

    def __init__(self, ch: Clickhouse | None = None) -> None:
        self._given_ch = ch
        self.ch: Clickhouse | None = None
        self.projector: Projector | None = None
        self.consumers: list[ProjectionConsumer] = []
        self.lag: LagMonitor | None = None
        self.queries: AuditQueries | None = None
        self.rpc: RpcServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._consumer_tasks: list[asyncio.Task[Any]] = []
        self._schema_ready = False

    async def start(self, ctx: ServiceContext) -> None:
        """Create the schema, start the projector, the lag monitor and the RPC server."""
        self.ch = self._given_ch or open_clickhouse(ctx.settings)
        self.projector = Projector(self.ch, ctx.store)
        await self.projector.start()
        self._schema_ready = True
        self.lag = LagMonitor(self.projector, ctx.store, ctx.registry)
        self.consumers = [ProjectionConsumer(ctx.js, self.projector, lane) for lane in LANES]
        key = evidence_signing_key(ctx.settings.evidence_signing_key, ctx.settings.data_dir)
        evidence = EvidenceQueries(ctx.store, key)
        self.queries = AuditQueries(
            self.ch,
            self.projector,
            ctx.store,
            self.lag,
            store_reads=evidence.routes(),
            answers=answer_cache(self.projector, ctx.settings),
        )
        # SOC2 evidence jobs are built, resumed and served by the export jobs' machinery.
        evidence.attach_jobs(self.queries.exports)
        self.rpc = rpc_server(ctx.nc, self.queries)
        await self.rpc.start()
        self._consumer_tasks = [
            asyncio.create_task(c.run(), name=f"audit-{c.lane.name}") for c in self.consumers
        ]
        self._tasks = [
            *self._consumer_tasks,
            asyncio.create_task(self.lag.run(), name="audit-lag"),
            # Export jobs left unfinished by a stopped process are built again.
            asyncio.create_task(self.queries.exports.follow(), name="audit-exports"),
        ]
        ctx.tasks.extend(self._tasks)

    async def stop(self) -> None:
        """Stop consuming, write and ack what is buffered, then close ClickHouse."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.queries is not None:
            await self.queries.exports.stop()
        for c in self.consumers:
            c.stop()
        for task in self._consumer_tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
        if self.projector is not None:
            await self.projector.close()
        for c in self.consumers:
            await c.drain()
        for t in self._tasks:
            if t not in self._consumer_tasks:
                t.cancel()
        if self.ch is not None and self._given_ch is None:
            await self.ch.close()

    def router(self) -> APIRouter | None:
        """No HTTP routes: every query is a NATS request (the gateway exposes them)."""
        return None

    def ready(self) -> bool:
        """Schema created and both lanes consuming."""
        return bool(
            self._schema_ready and self.consumers and all(c.running for c in self.consumers)
        )


def answer_cache(projector: Projector, settings: Settings) -> AnswerCache[bytes] | None:
    """The cache of the console's reads' answers (``MC_ANSWER_CACHE_MB``, 0: none), valid while
    ``projector``'s data version stands (aggregates: ``MC_ANALYTICS_MAX_STALENESS_MS`` more)."""
    if settings.answer_cache_mb == 0:
        return None
    return AnswerCache(
        lambda: projector.data_version,
        size=len,
        max_staleness=settings.analytics_max_staleness_ms / 1000,
        max_bytes=settings.answer_cache_mb * 1024 * 1024,
    )


def main() -> None:
    """Run the audit-replay service until SIGTERM."""
    run_service(AuditReplayService())
