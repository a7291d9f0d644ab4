"""What the whole-system benchmarks share: a scratch system, percentiles and the common floors.

Imported by the ``bench_*.py`` scripts beside it (they run as ``python scripts/bench_x.py``, so
this directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import SecretStr

from libs.contracts.subjects import EVENTS_PREFIX, WORK_PREFIX, inbox_prefix
from libs.eventbus.jetstream import connect
from libs.runtime.busauth import (
    Permissions,
    authorization_config,
    bus_permissions,
    credentials_dir,
    write_credentials,
)
from libs.runtime.embedded import ServerProcess, start_nats
from libs.runtime.registry import discover
from libs.runtime.urls import resolve_url
from libs.settings import Settings
from services.gateway.keys import provision_tenant, run_with_pool

BENCH_USER = "bench"
"""The benchmarks' own NATS user: it watches events and work items go by and answers its own
echo requests."""


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def mctl(*args: str, env: dict[str, str] | None = None) -> None:
    """Run ``mctl`` with this interpreter."""
    subprocess.run([sys.executable, "-m", "libs.runtime.cli", *args], check=True, env=env)


def bench_nats(data_dir: Path) -> ServerProcess:
    """The system's NATS server, as ``mctl up`` would start it (same place, same users), plus
    the benchmarks' user; ``mctl up`` then uses it as an external server."""
    permissions = bus_permissions(discover())
    permissions[BENCH_USER] = Permissions(
        publish=("bench.>",),
        subscribe=(
            f"{inbox_prefix(BENCH_USER)}.>",
            "bench.>",
            f"{EVENTS_PREFIX}.>",
            f"{WORK_PREFIX}.>",
        ),
        allow_responses=True,
    )
    passwords = write_credentials(credentials_dir(data_dir), permissions)
    return start_nats(data_dir, authorization=authorization_config(permissions, passwords))


async def bench_connect(data_dir: Path, url: str) -> NATS:
    """A NATS connection as the benchmarks' user of the system on ``data_dir``."""
    password = (credentials_dir(data_dir) / BENCH_USER).read_text()
    return await connect(url, "bench", (BENCH_USER, SecretStr(password)))


@dataclass
class System:
    """A whole system started for a benchmark, and an API key of its benchmark tenant."""

    data_dir: Path
    state: dict[str, Any]
    key: str

    def url_of(self, service: str) -> str:
        """The HTTP URL of ``service``'s first process."""
        return str(next(c["url"] for c in self.state["children"] if c["name"] == service))

    @property
    def gateway(self) -> str:
        return self.url_of("gateway")

    @property
    def admin_url(self) -> str:
        """The embedded PostgreSQL's administrator URL, with its password (never to print)."""
        return admin_url_of(self.data_dir)


def admin_url_of(data_dir: Path) -> str:
    """The administrator URL of the system running on ``data_dir``."""
    found = resolve_url("admin_database", settings=Settings.model_construct(), data_dir=data_dir)
    if found is None:
        raise RuntimeError(f"no system is running on {data_dir}")
    return found.secret()


@contextmanager
def whole_system(
    tenant: str, prefix: str = "mc-bench-", prepare: Callable[[Path], None] | None = None
) -> Iterator[System]:
    """``mctl up --detach`` in a scratch data directory with ``tenant`` provisioned; stopped and
    removed on exit. ``prepare`` is given the data directory before the system starts (to fill
    the projections' embedded chDB, which only one process may open)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix)) / "mc"
    data_dir.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(data_dir)
    nats_server = bench_nats(data_dir)
    env = {
        **os.environ,
        "NATS_URL": nats_server.url,
        "MC_NATS_CREDENTIALS_DIR": str(credentials_dir(data_dir)),
    }
    try:
        mctl("up", "--detach", "--data-dir", str(data_dir), env=env)
    except BaseException:
        nats_server.stop()
        raise
    try:
        state = json.loads((data_dir / "state.json").read_text())
        _, key = run_with_pool(admin_url_of(data_dir), lambda p: provision_tenant(p, tenant))
        yield System(data_dir, state, key)
    finally:
        mctl("down", "--data-dir", str(data_dir))
        nats_server.stop()
        shutil.rmtree(data_dir.parent, ignore_errors=True)


async def bare_nats_round_trip(data_dir: Path, url: str, n: int = 2000) -> list[float]:
    """Seconds per request–reply round trip to an in-process echo responder."""
    nc = await bench_connect(data_dir, url)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await nc.request("bench.echo", b"{}", timeout=2)
        out.append(time.perf_counter() - t0)
    await nc.close()
    return out


def bare_chdb_insert(rows: int, per_run: int = 500) -> float:
    """Rows per second of a bare batched chDB insert of step rows (the ingest floor), through
    the same clickhouse-connect client the projections use."""
    import clickhouse_connect

    d = tempfile.mkdtemp(prefix="mc-bench-ch-")
    try:
        ch: Any = clickhouse_connect.get_client(dsn=f"chdb://{d}")
        ch.command("CREATE DATABASE b")
        ch.command(
            "CREATE TABLE b.steps (tenant_id String, run_id String, step_index UInt32, "
            "input_tokens UInt64, output_tokens UInt64, version UInt64) "
            "ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, run_id, step_index)"
        )
        data = [
            json.dumps({"tenant_id": "t", "run_id": f"r{i // per_run}", "step_index": i % per_run,
                        "input_tokens": 10, "output_tokens": 5, "version": i}).encode()
            for i in range(rows)
        ]  # fmt: skip
        t0 = time.perf_counter()
        for start in range(0, rows, 5000):
            body = b"\n".join(data[start : start + 5000])
            ch.raw_insert("b.steps", None, insert_block=body, fmt="JSONEachRow")
        rate = rows / (time.perf_counter() - t0)
        ch.close()
        return rate
    finally:
        shutil.rmtree(d, ignore_errors=True)
