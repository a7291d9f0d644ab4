"""Foundation benchmark: event-store appends, relay throughput, publish-to-consume latency.

Each figure is printed beside its floor, measured in the same run on the same servers: bare
batched INSERT for batched appends, bare single-row INSERT + commit from as many concurrent
connections for concurrent single-event appends, bare pipelined JetStream publish (one message
per event) for the relay.

    python scripts/bench_foundation.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import StepRecorded
from libs.contracts.subjects import events_filter
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import ConsumerSpec, connect, ensure_consumer, ensure_streams
from libs.eventbus.migrate import apply_all
from libs.eventbus.relay import Relay
from libs.eventbus.store import EventStore
from libs.runtime.embedded import (
    ServerProcess,
    nats_server_binary,
    start_nats,
    start_postgres,
    wait_for_port,
)

PAYLOAD = {"text": "x" * 800}  # about 1 KB per event, like a step with a short prompt


def event(tenant: str, run: str, i: int):  # type: ignore[no-untyped-def]
    return envelope_for(
        StepRecorded(run_id=run, agent_id="bench", step_index=i + 1, input=PAYLOAD),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", run),
        correlation_id="bench",
        actor="bench",
    )


async def relay_throughput(
    url: str, js: JetStreamContext, pending: int, *, atomic: bool, name: str
) -> float:
    """Events/s of one relay publishing the whole store from the start of the log."""
    relay = Relay(url, js, name=name, batch_size=1000, in_flight=512, atomic=atomic)
    t0 = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as rc:
        await rc.execute(
            "INSERT INTO eventstore.relay_checkpoints (name, position) VALUES (%s, 0)", (name,)
        )
        published = 0
        while published < pending:
            published += await relay.relay_once(rc)
    return pending / (time.perf_counter() - t0)


async def on_fresh_server(
    data_dir: Path, url: str, pending: int, *, atomic: bool, sync: bool
) -> float:
    """Relay throughput into a NATS server of its own (with or without sync_interval: always)."""
    server = start_nats(data_dir) if sync else start_nats_default_sync(data_dir)
    try:
        nc = await connect(server.url, "bench-relay")
        js = nc.jetstream()
        await ensure_streams(js)
        name = f"bench-{data_dir.name}"
        rate = await relay_throughput(url, js, pending, atomic=atomic, name=name)
        await nc.close()
        return rate
    finally:
        server.stop()


def start_nats_default_sync(data_dir: Path) -> ServerProcess:
    """An embedded NATS server with JetStream's default sync_interval (fsync every 2 minutes)."""
    server = start_nats(data_dir)
    server.stop()
    conf = data_dir / "nats" / "nats.conf"
    conf.write_text(conf.read_text().replace("  sync_interval: always\n", ""))
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(server.port, 20, proc)
    return ServerProcess("nats", proc, server.port, server.url, server.extra)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def line(name: str, value: float, unit: str, floor: float | None = None) -> None:
    if floor:
        ratio = value / floor
        print(f"  {name:<44} {value:>12,.0f} {unit:<9} floor {floor:>12,.0f}  ratio {ratio:5.2f}")
    else:
        print(f"  {name:<44} {value:>12,.2f} {unit}")


async def main(n: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mc-bench-"))
    nats_srv = start_nats(base)
    pg = start_postgres(base)
    apply_all(pg.dsn())
    url = pg.dsn()
    pool = await open_pool(url, max_size=4)
    store = EventStore(pool)
    nc = await connect(nats_srv.url, "bench")
    js = nc.jetstream()
    await ensure_streams(js)
    try:
        print(f"Mission Control foundation benchmark ({n:,} events of ~1 KB; 2-core machine)")

        # Floor: bare batched INSERT of the same rows into a plain table.
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("CREATE TABLE bare (id uuid, stream text, v int, payload jsonb)")
        t0 = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(pg.dsn()) as c:
            for start in range(0, n, 500):
                async with c.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO bare VALUES (%s, %s, %s, %s)",
                        [(uuid.uuid4(), "s", i, Jsonb(PAYLOAD)) for i in range(start, start + 500)],
                    )
                await c.commit()
        bare_insert = n / (time.perf_counter() - t0)

        single = min(2000, n // 10)
        t0 = time.perf_counter()
        for i in range(single):
            await store.append(
                stream_id_for("bench", "run", f"single{i % 50}"),
                [event("bench", f"single{i % 50}", i)],
            )
        append_single = single / (time.perf_counter() - t0)

        # 16 concurrent writers, one single-event append per transaction, each to its own
        # streams; floor: bare single-row INSERT + commit from 16 concurrent connections.
        writers = 16
        per_writer = max(50, n // 40)
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("CREATE TABLE bare_single (id uuid, stream text, v int, payload jsonb)")

        async def bare_writer(w: int) -> None:
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as c:
                for i in range(per_writer):
                    await c.execute(
                        "INSERT INTO bare_single VALUES (%s, %s, %s, %s)",
                        (uuid.uuid4(), f"w{w}", i, Jsonb(PAYLOAD)),
                    )

        t0 = time.perf_counter()
        await asyncio.gather(*(bare_writer(w) for w in range(writers)))
        bare_concurrent = writers * per_writer / (time.perf_counter() - t0)

        wide_pool = await open_pool(url, min_size=writers, max_size=writers)
        wide = EventStore(wide_pool)

        async def store_writer(w: int) -> None:
            for i in range(per_writer):
                run = f"conc{w}-{i % 5}"
                await wide.append(stream_id_for("bench", "run", run), [event("bench", run, i)])

        t0 = time.perf_counter()
        await asyncio.gather(*(store_writer(w) for w in range(writers)))
        append_concurrent = writers * per_writer / (time.perf_counter() - t0)
        await wide_pool.close()
        single += writers * per_writer

        t0 = time.perf_counter()
        for start in range(0, n, 500):
            run = f"batch{start // 500}"
            await store.append(
                stream_id_for("bench", "run", run), [event("bench", run, i) for i in range(500)]
            )
        append_batched = n / (time.perf_counter() - t0)

        print("append (PostgreSQL event store, hash-chained, per-stream locks)")
        line("append, one event per transaction", append_single, "events/s")
        line(
            f"append, one event per tx, {writers} writers",
            append_concurrent,
            "events/s",
            bare_concurrent,
        )
        line("append, 500 events per transaction", append_batched, "events/s", bare_insert)

        # Relay: everything appended so far is pending. The same events go to three servers:
        # atomic batches and the old one-message-per-event pipelining on sync_interval: always,
        # and atomic batches on the default sync_interval.
        pending = single + n
        relay_rate = await relay_throughput(url, js, pending, atomic=True, name="default")
        pipelined = await on_fresh_server(base / "b", url, pending, atomic=False, sync=True)
        # sync_interval always vs the default, alternating on fresh servers: the machine's load
        # drifts, and one run each is not enough to tell a few percent apart.
        always: list[float] = [relay_rate]
        default_sync: list[float] = []
        for i in range(2):
            default_sync.append(
                await on_fresh_server(base / f"d{i}", url, pending, atomic=True, sync=False)
            )
            if i == 0:
                always.append(
                    await on_fresh_server(base / f"a{i}", url, pending, atomic=True, sync=True)
                )

        # Floor: bare pipelined publish of the same number of messages to a scratch stream.
        await js.add_stream(StreamConfig(name="BARE", subjects=["bare.>"]))
        body = b"x" * 1100
        t0 = time.perf_counter()
        for start in range(0, pending, 512):
            await asyncio.gather(
                *(
                    js.publish("bare.x", body, headers={"Nats-Msg-Id": f"b{i}"})
                    for i in range(start, min(start + 512, pending))
                )
            )
        bare_pub = pending / (time.perf_counter() - t0)
        print("relay (store -> JetStream, in log order, Nats-Msg-Id dedup)")
        for k, rate in enumerate(always, 1):
            line(f"relay, atomic batches, sync always ({k})", rate, "events/s", bare_pub)
        for k, rate in enumerate(default_sync, 1):
            line(f"relay, atomic batches, default sync ({k})", rate, "events/s", bare_pub)
        line("relay, one message per event (pipelined)", pipelined, "events/s", bare_pub)

        # Publish-to-consume latency: append one event at a time, relay running, consumer waiting.
        relay_task = asyncio.create_task(Relay(url, js, idle_wait=1.0).run())
        spec = ConsumerSpec(
            durable="bench-latency", filter_subjects=(events_filter(">", "lat"),), fetch_batch=10
        )
        await ensure_consumer(js, spec)
        sub = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        latencies: list[float] = []
        for i in range(300):
            t0 = time.perf_counter()
            await store.append(stream_id_for("lat", "run", "r"), [event("lat", "r", i)])
            got = False
            while not got:
                try:
                    msgs = await sub.fetch(1, timeout=2)
                except Exception:
                    continue
                for m in msgs:
                    await m.ack()
                    got = True
            latencies.append((time.perf_counter() - t0) * 1000)
        relay_task.cancel()
        print("publish-to-consume (append commit -> relay -> JetStream -> pull consumer)")
        line("latency p50", statistics.median(latencies), "ms")
        line("latency p99", pct(latencies, 99), "ms")
    finally:
        await nc.close()
        await pool.close()
        pg.stop()
        nats_srv.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    asyncio.run(main(ap.parse_args().events))
