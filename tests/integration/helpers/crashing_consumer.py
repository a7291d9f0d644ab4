"""A consumer process that commits its effect and then dies (kill -9) before acking.

Run as ``python -m tests.integration.helpers.crashing_consumer NATS DB DURABLE SCHEMA TENANT``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from nats.aio.msg import Msg

from libs.contracts.subjects import events_filter
from libs.eventbus.consumer import EventConsumer
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import ConsumerSpec, connect


class DiesBeforeAck(EventConsumer):
    async def ack(self, msg: Msg) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    nats_url, db_url, durable, schema, tenant = sys.argv[1:6]
    nc = await connect(nats_url, "crasher")
    pool = await open_pool(db_url)

    async def effect(conn, env) -> None:  # type: ignore[no-untyped-def]
        await conn.execute(f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (env.event_id,))

    consumer = DiesBeforeAck(
        nc.jetstream(),
        pool,
        consumer_spec(durable, tenant),
        effect,
        applied_table=f"{schema}.applied_events",
    )
    await consumer.run()


def consumer_spec(durable: str, tenant: str) -> ConsumerSpec:
    # A short ack wait so the redelivery after the crash comes quickly.
    return ConsumerSpec(
        durable=durable, filter_subjects=(events_filter(">", tenant),), ack_wait=1.5, fetch_batch=1
    )


if __name__ == "__main__":
    asyncio.run(main())
