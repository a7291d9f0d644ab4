"""Diff benchmark: 10,000-row diffs computed and paged, each figure beside a floor measured in the
same run.

Library (``libs/diffing.py``, in this process):

* two agent specs of ``--rows`` fields each, every field changed: ``diff_documents`` (rows, marks
  and the RFC 8785 hash) beside the floor of encoding both inputs as RFC 8785 JSON once;
* two bundles whose runbook of ``--rows`` lines is rewritten: ``diff_bundles`` beside the floor
  of plain :mod:`difflib` opcodes over the same lines;
* pages of 100 rows at offsets across the diff (``page``, both views) beside the floor of
  ``orjson.dumps`` of the same 100 rows.

Through the API (``--api``, a whole system started by ``mctl up`` in a scratch directory): the
same specs and bundles by ``POST /v1/diffs`` (gateway → NATS → policy-admission, computed and
the request stored), then ``GET /v1/diffs/{hash}`` pages, beside the library's own time for the
same diff and a bare NATS round trip.

    python scripts/bench_diff.py [--rows 10000] [--repeat 5] [--api]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from benchkit import System, bare_nats_round_trip, pct, whole_system
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs import diffing
from libs import policy_bundles as artifacts
from libs.contracts.canonical import canonical_json

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench-diff"
PASSWORD = "a passphrase long enough for the bench"
PAGE = 100


def specs(rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two agent specs whose ``rows`` tool settings all differ."""
    old = {
        "identity": {"name": "bench-agent", "role": "support"},
        "limits": {"max_tokens": 10_000},
        "tools": {f"tool-{i:05d}": {"timeout_s": 30, "scope": "read"} for i in range(rows)},
    }
    new = {
        "identity": {"name": "bench-agent", "role": "support"},
        "limits": {"max_tokens": 10_000},
        "tools": {f"tool-{i:05d}": {"timeout_s": 30, "scope": "write"} for i in range(rows)},
    }
    return old, new


def bundle_files(rows: int, revision: str, variant: str) -> dict[str, bytes]:
    """The repository's bundle with a runbook of ``rows`` lines, worded by ``variant``."""
    files = artifacts.directory_files(REPO / "policy-bundle", revision=revision)
    lines = "".join(f"step {i:05d}: {variant} the run's budget\n" for i in range(rows))
    files["runbooks/long.md"] = lines.encode()
    return files


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The median seconds of ``repeat`` calls of ``fn`` and its last result."""
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def row(what: str, took: str, floor_what: str, floor: str, ratio: float) -> None:
    print(f"| {what} | {took} | {floor_what}: {floor} | {ratio:.1f}× |")


def library(rows: int, repeat: int) -> dict[str, float]:
    """The library's figures; returns the diff times for the API's comparison."""
    print(f"\nLibrary, {rows:,} rows, median of {repeat}\n")
    print("| what | time | floor (same run) | ratio |\n|---|---|---|---|")
    old, new = specs(rows)
    spent, diff = best(lambda: diffing.diff_documents(old, new, locked_fields=["limits"]), repeat)
    floor, _ = best(lambda: (canonical_json(old), canonical_json(new)), repeat)
    assert len(diff.rows) == rows
    row(
        f"agent specs: diff_documents ({len(diff.rows):,} rows + hash)",
        ms(spent),
        "RFC 8785 encoding of both specs",
        ms(floor),
        spent / floor,
    )
    out = {"documents": spent}

    a, b = bundle_files(rows, "1", "check"), bundle_files(rows, "2", "verify")
    da, db = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    spent, bdiff = best(lambda: diffing.diff_bundles(a, b, old_digest=da, new_digest=db), repeat)
    la, lb = (
        a["runbooks/long.md"].decode().splitlines(),
        b["runbooks/long.md"].decode().splitlines(),
    )
    floor, _ = best(lambda: difflib.SequenceMatcher(None, la, lb).get_opcodes(), repeat)
    row(
        f"bundles: diff_bundles ({len(bdiff.rows):,} rows + hash)",
        ms(spent),
        "plain difflib opcodes of the same lines",
        ms(floor),
        spent / floor,
    )
    out["bundles"] = spent

    offsets = list(range(0, len(diff.rows), max(1, len(diff.rows) // 50)))
    for view in diffing.VIEWS:
        times, floors = [], []
        for offset in offsets:
            cursor = diffing.encode_cursor(diff.diff_hash, offset) if offset else None
            started = time.perf_counter()
            diffing.page(diff, cursor=cursor, limit=PAGE, view=view)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            orjson.dumps([r.as_dict() for r in diff.rows[offset : offset + PAGE]])
            floors.append(time.perf_counter() - started)
        row(
            f"a page of {PAGE} rows, {view} (p50 / p99 of {len(offsets)})",
            f"{ms(pct(times, 50))} / {ms(pct(times, 99))}",
            "orjson of the same rows (p50)",
            ms(pct(floors, 50)),
            pct(times, 50) / pct(floors, 50),
        )
    return out


def _person_token(system: System, http: httpx.Client) -> dict[str, str]:
    """An admin person of the bench tenant (to register the signing key)."""
    user = f"bench-admin-{uuid.uuid4().hex[:8]}"
    db = ("--database-url", system.admin_url)
    cli = [sys.executable, "-m", "libs.runtime.cli"]
    subprocess.run(
        [*cli, "user", "create", user, "--password-stdin", *db],
        input=f"{PASSWORD}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    subprocess.run([*cli, "user", "grant", user, TENANT, "admin", *db], check=True)
    resp = http.post("/v1/auth/token", json={"username": user, "password": PASSWORD})
    resp.raise_for_status()
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def _pages(http: httpx.Client, diff_hash: str, total: int) -> list[float]:
    times = []
    for offset in range(0, total, max(1, total // 50)):
        cursor = diffing.encode_cursor(diff_hash, offset) if offset else None
        params: dict[str, Any] = {"limit": PAGE, **({"cursor": cursor} if cursor else {})}
        started = time.perf_counter()
        resp = http.get(f"/v1/diffs/{diff_hash}", params=params)
        times.append(time.perf_counter() - started)
        resp.raise_for_status()
    return times


def api(rows: int, repeat: int, lib: dict[str, float]) -> None:
    """The same diffs through the gateway."""
    with whole_system(TENANT, prefix="mc-bench-diff-") as system:
        floor_rt = pct(
            asyncio.run(bare_nats_round_trip(system.data_dir, system.state["nats_url"], 500)), 50
        )
        key = {"Authorization": f"Bearer {system.key}"}
        with httpx.Client(base_url=system.gateway, timeout=120) as http:
            admin = _person_token(system, http)
            signer = Ed25519PrivateKey.generate()
            http.put(
                "/v1/policy-signing-keys/bench",
                json={"public_key": artifacts.public_pem(signer)},
                headers=admin,
            ).raise_for_status()
            digests = []
            for revision, variant in (("1", "check"), ("2", "verify")):
                archive = artifacts.signed_archive(
                    bundle_files(rows, revision, variant), signer, "bench"
                )
                http.post(
                    "/v1/policy-bundles",
                    params={"environment": "sandbox"},
                    content=archive,
                    headers={**admin, "Content-Type": "application/gzip"},
                ).raise_for_status()
                digests.append(artifacts.archive_digest(archive))
            old, new = specs(rows)
            bodies = {
                "documents": {"old_spec": old, "new_spec": new, "locked_fields": ["limits"]},
                "bundles": {"old_digest": digests[0], "new_digest": digests[1]},
            }
            print(
                f"\nThrough the API (whole system on this box), {rows:,} rows, median of {repeat}\n"
            )
            print("| what | time | floor (same run) | ratio |\n|---|---|---|---|")
            for kind, body in bodies.items():
                times, answer = [], {}
                for _ in range(repeat):
                    started = time.perf_counter()
                    resp = http.post("/v1/diffs", json=body, headers=key)
                    times.append(time.perf_counter() - started)
                    resp.raise_for_status()
                    answer = resp.json()
                total = answer["total"]
                row(
                    f"POST /v1/diffs, {kind} ({total:,} rows; first page of {PAGE})",
                    ms(statistics.median(times)),
                    "the library's diff alone",
                    ms(lib[kind]),
                    statistics.median(times) / lib[kind],
                )
                http.headers.update(key)
                pages = _pages(http, answer["diff_hash"], total)
                whoami = []
                for _ in range(len(pages)):
                    started = time.perf_counter()
                    http.get("/v1/auth/whoami").raise_for_status()
                    whoami.append(time.perf_counter() - started)
                row(
                    f"GET /v1/diffs/{{hash}}, {kind}, a page of {PAGE} (p50 / p99 of {len(pages)})",
                    f"{ms(pct(pages, 50))} / {ms(pct(pages, 99))}",
                    f"GET /v1/auth/whoami, p50 (bare NATS round trip: {ms(floor_rt)})",
                    ms(pct(whoami, 50)),
                    pct(pages, 50) / pct(whoami, 50),
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--api", action="store_true", help="also through a whole system's API")
    args = ap.parse_args()
    lib = library(args.rows, args.repeat)
    if args.api:
        api(args.rows, args.repeat, lib)


if __name__ == "__main__":
    main()
