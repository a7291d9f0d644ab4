"""Evaluating a candidate bundle on many recorded inputs, off the event loop.

A decision of the repository's bundle costs regopy about 1.5 ms of CPU, nearly all of it in the
rules (a trivial rule costs 0.1 ms a call), and regopy 1.5 cannot evaluate a list of inputs in
one query: ``with input as x`` aborts its compiler. So the evaluator

* evaluates each distinct input once (identical inputs, byte for byte in canonical JSON, share
  one answer), and
* runs the evaluations in worker processes (``spawn``), each holding the compiled candidate, so
  admission on the event loop never waits for a simulation and every core takes a share.

The measured figures are in ``docs/benchmarks.md`` (``scripts/bench_simulation.py``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from services.policy_admission.bundle import BundleError, PolicyBundle

MAX_CACHED = 200_000
"""Distinct inputs whose answers one job keeps (a few hundred bytes each)."""

_COMPILED: dict[str, PolicyBundle] = {}


def _bundle(digest: str, modules: Sequence[tuple[str, str]]) -> PolicyBundle:
    bundle = _COMPILED.get(digest)
    if bundle is None:
        _COMPILED.clear()  # one candidate at a time per worker
        bundle = _COMPILED[digest] = PolicyBundle(
            Path(f"bundle:{digest}"), list(modules), digest=digest
        )
    return bundle


def evaluate_chunk(
    digest: str, modules: Sequence[tuple[str, str]], inputs: Sequence[bytes]
) -> list[bytes | None]:
    """The candidate's ``decision`` document (JSON) for each input; ``None`` where it fails
    (undefined, or an evaluation error). Runs in a worker process; the compiled bundle is kept
    there for the next chunk."""
    bundle = _bundle(digest, modules)
    out: list[bytes | None] = []
    for raw in inputs:
        try:
            out.append(orjson.dumps(bundle.evaluate(orjson.loads(raw))))
        except BundleError:
            out.append(None)
    return out


def default_workers() -> int:
    """One worker per core."""
    return max(1, os.cpu_count() or 1)


class BatchEvaluator:
    """A candidate bundle (its modules and ``data.json``, as :func:`~libs.policy_bundles.
    content_of` lists them) evaluated on pages of inputs by ``workers`` processes."""

    def __init__(
        self,
        digest: str,
        modules: Sequence[tuple[str, str]],
        *,
        workers: int | None = None,
    ) -> None:
        self.digest = digest
        self.modules = list(modules)
        self.workers = workers or default_workers()
        self.evaluated = 0
        self.reused = 0
        self._cache: dict[bytes, bytes | None] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> BatchEvaluator:
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def evaluate(self, inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any] | None]:
        """The ``decision`` document for each input (``None`` where the candidate fails)."""
        if self._pool is None:
            raise RuntimeError("use the evaluator as a context manager")
        keys = [orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) for doc in inputs]
        known = {k: self._cache[k] for k in keys if k in self._cache}
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        self.reused += len(keys) - len(todo)
        self.evaluated += len(todo)
        if todo:
            size = -(-len(todo) // self.workers)
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            loop = asyncio.get_running_loop()
            answers = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._pool, evaluate_chunk, self.digest, self.modules, chunk
                    )
                    for chunk in chunks
                )
            )
            fresh = {
                k: a
                for chunk, answer in zip(chunks, answers, strict=True)
                for k, a in zip(chunk, answer, strict=True)
            }
            known.update(fresh)
            if len(self._cache) + len(fresh) > MAX_CACHED:
                self._cache.clear()
            self._cache.update(fresh)
        out: list[dict[str, Any] | None] = []
        for key in keys:
            raw = known[key]
            out.append(None if raw is None else orjson.loads(raw))
        return out
