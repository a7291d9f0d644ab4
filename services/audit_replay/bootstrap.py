"""Wiring of the audit-replay service into the shared service host."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from fastapi import APIRouter

from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ServiceContext, run_service
from services.audit_replay.clickhouse import Clickhouse, open_clickhouse
from services.audit_replay.entrypoints import AuditQueries, rpc_server
from services.audit_replay.handlers import LagMonitor, ProjectionConsumer, Projector

log = structlog.get_logger("audit")


class AuditReplayService:
    """Projects every event into ClickHouse and answers audit queries over NATS.

    Ready once the ClickHouse schema exists, the projector consumer is running and the RPC
    routes are subscribed.
    """

    name: str = "audit-replay"

    def __init__(self, ch: Clickhouse | None = None) -> None:
        self._given_ch = ch
        self.ch: Clickhouse | None = None
        self.projector: Projector | None = None
        self.consumer: ProjectionConsumer | None = None
        self.lag: LagMonitor | None = None
        self.queries: AuditQueries | None = None
        self.rpc: RpcServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._schema_ready = False

    async def start(self, ctx: ServiceContext) -> None:
        """Create the schema, start the projector, the lag monitor and the RPC server."""
        self.ch = self._given_ch or open_clickhouse(ctx.settings)
        self.projector = Projector(self.ch, ctx.store)
        await self.projector.start()
        self._schema_ready = True
        self.lag = LagMonitor(self.projector, ctx.store, ctx.registry)
        self.consumer = ProjectionConsumer(ctx.js, self.projector)
        self.queries = AuditQueries(self.ch, self.projector, ctx.store, ctx.pool, self.lag)
        self.rpc = rpc_server(ctx.nc, self.queries)
        await self.rpc.start()
        self._tasks = [
            asyncio.create_task(self.consumer.run(), name="audit-projector"),
            asyncio.create_task(self.lag.run(), name="audit-lag"),
        ]
        ctx.tasks.extend(self._tasks)

    async def stop(self) -> None:
        """Stop consuming, write and ack what is buffered, then close ClickHouse."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.consumer is not None:
            self.consumer.stop()
        consumer_task = self._tasks[0] if self._tasks else None
        if consumer_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(consumer_task, 5.0)
        if self.projector is not None:
            await self.projector.close()
        if self.consumer is not None:
            await self.consumer.drain()
        for t in self._tasks[1:]:
            t.cancel()
        if self.ch is not None and self._given_ch is None:
            await self.ch.close()

    def router(self) -> APIRouter | None:
        """No HTTP routes: every query is a NATS request (the gateway exposes them)."""
        return None

    def ready(self) -> bool:
        """Schema created and the projector consuming."""
        return bool(self._schema_ready and self.consumer is not None and self.consumer.running)


def main() -> None:
    """Run the audit-replay service until SIGTERM."""
    run_service(AuditReplayService())
