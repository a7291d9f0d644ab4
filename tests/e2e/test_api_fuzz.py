"""No input yields a 5xx, and every answer matches the published OpenAPI document.

Two sources of inputs, both against the live system of ``whole_system``:

* schemathesis, every phase (examples, coverage, fuzzing and stateful) over every operation, then
  the stateful phase again over the run and incident operations, where it follows the document's
  links (start a run → admit, record, finish or read it; list runs → read one; list incidents →
  read, acknowledge or resolve one). It fails on any 5xx, on any status code the document does
  not list, and on any body, header or content type that does not match it.
* a table of bad inputs derived from the limits (:mod:`libs.contracts.limits`): every field of
  every body at, just over and far over its limits, of the wrong type, with NUL characters;
  bodies that are not JSON, not UTF-8 or nested past any parser; bad query, path and header
  values.

Each test records what it tried in ``<data dir>/fuzz-<name>.json``, and fails on any 5xx.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.contracts.limits import (
    MAX_AGENT_ID,
    MAX_BY,
    MAX_JSON_DEPTH,
    MAX_KIND,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_REASON,
    MAX_RUN_ID,
    MAX_STEP_INDEX,
    MAX_TOKENS,
)
from services.gateway.client import MissionControlClient
from tests.e2e.conftest import RunningSystem, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SEED = 20261130
# Coverage makes its own deterministic cases (about 1,000); fuzzing adds these per operation. The
# stateful phase sends valid data only, so that its chains get past their first step, and runs
# this many scenarios of up to 8 steps. About 2,000 requests in under 2 minutes.
CONFIG = """
[phases.fuzzing.generation]
max-examples = 12

[phases.stateful]
max-steps = 8

[phases.stateful.generation]
mode = "positive"
max-examples = 150
"""
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
# Where the stateful phase over the run and incident operations must have followed links from
# (a started run, the run list, the incident list), so it really chained operations. Which link
# it takes from each is its own random choice: each of these has several, walked over a hundred
# times a run in all.
CHAINS = (
    "POST /v1/runs -> [201] ",
    "GET /v1/runs -> [200] ",
    "GET /v1/incidents -> [200] ",
)
MIN_LINKS_FOLLOWED = 12


def _tenant_with_an_incident(sys_: RunningSystem, prefix: str) -> tuple[str, str]:
    """A fresh tenant, its key, and one run stopped by policy with an open incident, so the
    incident operations have something to act on."""
    tenant = f"{prefix}{uuid.uuid4().hex[:8]}"
    key = sys_.key_for(tenant)
    mc = MissionControlClient(sys_.gateway_url, key, timeout=30)
    run = mc.start_run(agent_id="fuzzed-agent").run_id
    denied = mc.admit(run, 1, model="gpt-4o", estimate={"input_tokens": 20_000})
    assert denied.outcome == "deny"
    wait_for(lambda: mc.incidents(run_id=run)["incidents"], 30, "the incident")
    return tenant, key


def _record(sys_: RunningSystem, name: str, figures: dict[str, Any]) -> None:
    (sys_.data_dir / f"fuzz-{name}.json").write_text(json.dumps(figures, indent=2))
    print(f"{name}: {json.dumps(figures)}")


def _schemathesis_cases(report: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(case, response) for every request schemathesis sent, from its NDJSON report."""
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        interactions = recorder.get("interactions", {})
        for case_id, case in recorder.get("cases", {}).items():
            response = (interactions.get(case_id) or {}).get("response")
            yield case, response


Counts = collections.Counter


def _schemathesis(
    sys_: RunningSystem, key: str, out_dir: Path, phases: str, *include_exclude: str
) -> tuple[
    collections.Counter[int],
    collections.Counter[str],
    collections.Counter[str],
    set[str],
    list[Any],
]:
    """Run schemathesis against the live gateway; what it sent, from its NDJSON report:
    (statuses, generation modes, phases, links followed, 5xx answers)."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "schemathesis.toml"
    config.write_text(CONFIG)
    proc = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            f"{sys_.gateway_url}/openapi.json",
            "--phases",
            phases,
            *include_exclude,
            "--checks",
            ",".join(CHECKS),
            "--header",
            f"Authorization: Bearer {key}",
            "--seed",
            str(SEED),
            # One worker: CPython 3.11 can fail compiling schemathesis' generated code in
            # parallel threads ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--report",
            "ndjson",
            "--report-dir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
            "PYTHONPATH": str(REPO),
        },
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    report = next(out_dir.glob("*.ndjson"))
    statuses: collections.Counter[int] = collections.Counter()
    modes: collections.Counter[str] = collections.Counter()
    phase_counts: collections.Counter[str] = collections.Counter()
    transitions: set[str] = set()
    server_errors = []
    for case, response in _schemathesis_cases(report):
        value = case["value"]
        meta = value.get("meta") or {}
        phase_counts[(meta.get("phase") or {}).get("name", "?")] += 1
        modes[(meta.get("generation") or {}).get("mode", "?")] += 1
        if case.get("transition"):
            transitions.add(case["transition"]["id"])
        if response is not None:
            statuses[response["status_code"]] += 1
            if response["status_code"] >= 500:
                server_errors.append((value["method"], value["path"], response["status_code"]))
    return statuses, modes, phase_counts, transitions, server_errors


@pytest.mark.timeout(900)
def test_schemathesis_stateful_finds_no_5xx_and_no_answer_off_the_schema(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    _, key = _tenant_with_an_incident(whole_system, "fuzz")
    # Every operation, every phase. A worker's long poll for work waits up to 30 s by design, and
    # an event stream stays open until its run or execution ends (the tenant's, never): their
    # inputs are covered by the table of bad inputs below, where waiting is not asked for.
    statuses, modes, phases, transitions, server_errors = _schemathesis(
        whole_system, key, tmp_path / "all", "examples,coverage,fuzzing,stateful",
        "--exclude-path-regex", "(work:take|/events|/v1/live)$",
    )  # fmt: skip
    # The stateful phase again over the run and incident operations alone: with every operation
    # in play, which links it walks depends on what it generates; with these alone it walks the
    # run's lifecycle and the incident's every time.
    _, _, _, lifecycle, lifecycle_errors = _schemathesis(
        whole_system, key, tmp_path / "lifecycle", "stateful",
        "--include-path-regex", "^/v1/(runs|incidents)", "--exclude-path-regex", "/events$",
    )  # fmt: skip
    sent = sum(statuses.values())
    _record(
        whole_system,
        "schemathesis",
        {
            "requests": sent,
            "negative_cases": modes["negative"],
            "by_phase": dict(phases),
            "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "transitions_followed": len(transitions),
            "lifecycle_transitions_followed": len(lifecycle),
            "server_errors": len(server_errors) + len(lifecycle_errors),
        },
    )
    assert server_errors == [] and lifecycle_errors == []
    assert sent >= 1000, f"only {sent} requests sent"
    assert phases["stateful"] > 0
    assert len(transitions) >= MIN_LINKS_FOLLOWED, sorted(transitions)
    assert len(lifecycle) >= MIN_LINKS_FOLLOWED, sorted(lifecycle)
    for chain in CHAINS:
        assert any(t.startswith(chain) for t in lifecycle), (chain, sorted(lifecycle))


# --- a table of bad inputs ------------------------------------------------------------------------

NUL = "a\x00b"
WRONG_TYPES: list[Any] = [None, True, -1, 1.5, 2**63, -(2**63) - 1, 10**40, "", "x", [], {}, [1]]
HOSTILE_TEXT = [
    NUL,
    "\\",
    "\n",
    "../../etc/passwd",
    "%00",
    "' OR 1=1 --",
    "{{tenant_id}}",
    "\u202eevil",
    "\ufeff",
    "🙂" * 60,
    "\udc80",
]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _strings(limit: int) -> list[Any]:
    return ["a" * limit, "a" * (limit + 1), "a" * (limit * 4 + 7), *HOSTILE_TEXT]


def _numbers(high: int) -> list[Any]:
    return [high, high + 1, -1, 0, 2**64, 1e300, "1", 1.5]


# Each body field with the values to try in it; the first value of a body is valid.
STEP_FIELDS: dict[str, list[Any]] = {
    "step_index": _numbers(MAX_STEP_INDEX),
    "kind": _strings(MAX_KIND),
    "model": _strings(MAX_NAME),
    "tool": _strings(MAX_NAME),
    "status": ["ok", "error", "denied", "OK", *HOSTILE_TEXT],
    "input_tokens": _numbers(MAX_TOKENS),
    "output_tokens": _numbers(MAX_TOKENS),
    "duration_ms": [0, 1e12, 1e12 + 1, -0.5, 1e309, "NaN"],
    "input": [
        _nested(MAX_JSON_DEPTH - 1),
        _nested(MAX_JSON_DEPTH),
        _nested(250),
        {"k": NUL},
        {NUL: 1},
        "x" * 100_000,
    ],
    "output": [_nested(MAX_JSON_DEPTH), {"deep": _nested(MAX_JSON_DEPTH)}, [NUL]],
    "error": _strings(10_000),
}
BODIES: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "start_run": (
        {"agent_id": "fuzzed-agent"},
        {
            "run_id": [*_strings(MAX_RUN_ID), "-leading-dash", "has space", "a/b", "a.b:c-d_e"],
            "agent_id": [*_strings(MAX_AGENT_ID), "a" * (MAX_AGENT_ID - 1), "\x7f", "tab\there"],
            "labels": [
                {f"k{i}": "v" for i in range(MAX_LABELS)},
                {f"k{i}": "v" for i in range(MAX_LABELS + 1)},
                {"k" * MAX_LABEL_KEY: "v" * MAX_LABEL_VALUE},
                {"k" * (MAX_LABEL_KEY + 1): "v"},
                {"k": "v" * (MAX_LABEL_VALUE + 1)},
                {"k": NUL},
                {"": "v"},
                {"k": 1},
                {"k": None},
            ],
        },
    ),
    "admit": (
        {"step_index": 1, "estimate": {"input_tokens": 1}},
        {
            "step_index": _numbers(MAX_STEP_INDEX),
            "kind": _strings(MAX_KIND),
            "model": _strings(MAX_NAME),
            "tool": _strings(MAX_NAME),
            "estimate": [
                {"input_tokens": MAX_TOKENS, "max_output_tokens": MAX_TOKENS},
                {"input_tokens": MAX_TOKENS + 1},
                {"input_tokens": -1},
                {"input_tokens": 2**64},
                {"unknown": 1},
                {"input_tokens": "1"},
            ],
        },
    ),
    "record_step": ({"step_index": 1}, STEP_FIELDS),
    "finish_run": (
        {"status": "completed"},
        {
            "status": ["failed", "stopped_by_policy", "running", *HOSTILE_TEXT],
            "reason": _strings(MAX_REASON),
        },
    ),
    "acknowledge": ({}, {"by": _strings(MAX_BY)}),
    "resolve": (
        {"resolution": "fixed"},
        {"resolution": _strings(MAX_REASON), "by": _strings(MAX_BY)},
    ),
    "set_prices": (
        {"prices": [{"model": "m", "input_per_token": "0.000001", "output_per_token": "0.000002"}]},
        {
            "prices": [
                [],
                [{"model": "m", "input_per_token": "1000.0", "output_per_token": 0}],
                [{"model": "m", "input_per_token": "1000.1", "output_per_token": 0}],
                [{"model": "m", "input_per_token": "1e-19", "output_per_token": 0}],
                [{"model": "m", "input_per_token": "-0", "output_per_token": "NaN"}],
                [{"model": "m", "input_per_token": "0." + "1" * 19, "output_per_token": 0}],
                [{"model": "m" * (MAX_NAME + 1), "input_per_token": 0, "output_per_token": 0}],
                [{"model": NUL, "input_per_token": 0, "output_per_token": 0}],
                [
                    {
                        "model": "m",
                        "input_per_token": 0,
                        "output_per_token": 0,
                        "effective_from": "x",
                    }
                ],
                [
                    {
                        "model": "m",
                        "input_per_token": 0,
                        "output_per_token": 0,
                        "effective_from": "9999-12-31T23:59:59+14:00",
                    }
                ],
                [
                    {"model": f"m{i}", "input_per_token": 0, "output_per_token": 0}
                    for i in range(1001)
                ],
            ]
        },
    ),
}
RAW_BODIES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"text"',
    b"{",
    b'{"agent_id": "a",}',
    b'{"agent_id": "a"}{"agent_id": "b"}',
    b'{"agent_id": 1e999999}',
    b'{"agent_id": NaN}',
    b'{"step_index": Infinity}',
    b"\xef\xbb\xbf{}",
    b'{"agent_id": "\xff"}',
    b'{"agent_id": "\xc3\x28"}',
    b'{"agent_id": "\xed\xa0\x80"}',
    b'{"agent_id": "\\ud800"}',
    b'{"agent_id": "\\u0000"}',
    b"\xfe\xff\x00{\x00}",
    b'{"a": ' * 100 + b"1" + b"}" * 100,
    b"[" * 1000 + b"]" * 1000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"agent_id": "a", "agent_id": "b"}',
    b'{"agent_id": "' + b"a" * 1_000_000 + b'"}',
]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
QUERIES: dict[str, list[dict[str, Any]]] = {
    "/v1/runs": [
        *({"limit": v} for v in (0, -1, 501, 500, "1e3", "abc", 2**64, "")),
        *({"offset": v} for v in (-1, 1_000_001, 2**63, "x")),
        *({"status": v} for v in ("live", "LIVE", "stopped", "", NUL)),
        *(
            {"agent_id": v}
            for v in ("a" * MAX_AGENT_ID, "a" * (MAX_AGENT_ID + 1), "\\", "\x01", NUL)
        ),
    ],
    "/v1/incidents": [
        *({"status": v} for v in ("open", "closed", "")),
        *({"run_id": v} for v in ("r" * MAX_RUN_ID, "r" * (MAX_RUN_ID + 1), "a b", NUL)),
        *({"policy_id": v} for v in ("token_limit", "p" * 201, "../x", "")),
        *({"limit": v} for v in (0, 501)),
    ],
    "/v1/costs": [
        *({"group_by": v} for v in ("run", "agent", "model", "tenant", "")),
        *({"run_id": v} for v in ("r" * (MAX_RUN_ID + 1), "%", NUL)),
    ],
    "/v1/analytics/productivity": [{"days": v} for v in (0, 1, 366, 367, -1, "x", 2**64, NUL)],
    "/v1/analytics/no_such_view": [{}],
    # Only refused inputs: a stream that opens stays open.
    "/v1/live": [{"heartbeat_s": v} for v in (0, 61, "x", "nan", NUL)],
    **{f"/v1/statements/{v}": [{}] for v in ("2026-01", "2026-13", "2026-1", "%00", "x" * 300)},
}
RUN_PATH_VALUES = [
    "r" * MAX_RUN_ID,
    "r" * (MAX_RUN_ID + 1),
    "-x",
    "a%20b",
    "a%00b",
    "..",
    "%2e%2e",
    "é",
]
INCIDENT_PATH_VALUES = ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "1" * 40, "%00"]
HEADERS: list[dict[str, str]] = [
    {"X-Correlation-Id": "c" * 201},
    {"X-Correlation-Id": "bad id with spaces"},
    {"traceparent": "00-zz-yy-01"},
    {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
    {"tracestate": "," * 1000},
    {"X-API-Key": "mc_" + "a" * 300},
]
# Random values for random fields, seeded: a few of every JSON type, with the awkward ones often.
RANDOM_CASES_PER_OPERATION = 1000
_AWKWARD_CHARS = "\x00\x01\x1f\x7f\\\"'/%\u2028\u202e\ufeff\udc80\U0001f642é"


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**70), MAX_TOKENS + 1])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e-320, 1e308, float("inf"), float("nan")])
    if kind in (4, 5):
        size = rng.choice([0, 1, 5, 99, 100, 101, 194, 195, 200, 201, 2001, 10_001])
        return "".join(rng.choice(_AWKWARD_CHARS + "abc") for _ in range(size))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        str(_random_json(rng, depth + 1))[:20]: _random_json(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def _json(body: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    # Encoded here, not by httpx: ASCII escapes let lone surrogates and NaN through to the server.
    content = json.dumps(body).encode()
    return {"content": content, "headers": {"Content-Type": "application/json", **(headers or {})}}


def _requests(
    run: str, finished_run: str, incident: str
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx keyword arguments) for every bad input of the table, then random
    values in random fields of every body."""
    targets = {
        "start_run": [("POST", "/v1/runs")],
        "admit": [("POST", f"/v1/runs/{r}/admissions") for r in (run, finished_run, "no-such-run")],
        "record_step": [
            ("POST", f"/v1/runs/{r}/steps") for r in (run, finished_run, "no-such-run")
        ],
        "finish_run": [("POST", f"/v1/runs/{r}/finish") for r in (finished_run, "no-such-run")],
        "acknowledge": [("POST", f"/v1/incidents/{incident}/acknowledge")],
        "resolve": [("POST", f"/v1/incidents/{uuid.UUID(int=1)}/resolve")],
        "set_prices": [("PUT", "/v1/prices")],
    }
    for name, (base, fields) in BODIES.items():
        for method, path in targets[name]:
            for field, values in fields.items():
                for value in [*values, *WRONG_TYPES]:
                    yield method, path, _json({**base, field: value})
            yield method, path, _json({**base, "unknown_field": 1})
            for raw in RAW_BODIES:
                for content_type in CONTENT_TYPES:
                    headers = {"Content-Type": content_type} if content_type else {}
                    yield method, path, {"content": raw, "headers": headers}
    batch_item = {"run_id": run, "step_index": 1}
    for field, values in STEP_FIELDS.items():
        for value in [*values, *WRONG_TYPES]:
            yield "POST", "/v1/steps:batch", _json({"items": [{**batch_item, field: value}]})
    for value in ([], [batch_item] * 5001, [{"step_index": 1}], [{**batch_item, "run_id": NUL}]):
        yield "POST", "/v1/steps:batch", _json({"items": value})
    for path, queries in QUERIES.items():
        for params in queries:
            yield "GET", path, {"params": params}
    for value in RUN_PATH_VALUES:
        for suffix in ("", "/trace", "/replay", "/export", "/export?format=xml", "/events"):
            yield "GET", f"/v1/runs/{value}{suffix}", {}
        for params in (
            {"at_position": 0},
            {"at_version": -1},
            {"at_position": 2**63},
            {"at_version": "x"},
        ):
            yield "GET", f"/v1/runs/{run}/replay", {"params": params}
    for wait in ("-1", "31", "abc", "1e400", "nan"):
        yield "POST", "/v1/agents/some-agent/work:take", {"params": {"wait_s": wait}}
    for agent in ("UPPER", "with space", "x" * 64, "%00"):
        yield "POST", f"/v1/agents/{agent}/work:take", {"params": {"wait_s": "0"}}
    for version in ("0", "-1", str(2**64), "x"):
        yield "GET", "/v1/workflows/some-flow", {"params": {"version": version}}
        yield "GET", "/v1/workflows/some-flow/diff", {"params": {"from_version": version}}
    for document in (
        b"name: [",
        b"- a list",
        b'{"name": "a\\u0000b", "steps": [{"id": "s", "agent": "a"}]}',
        b'{"name": "big", "steps": [{"id": "s", "agent": "a", "inputs": {"n": 1e999}}]}',
        b'{"name": "cyc", "steps": [{"id": "a", "agent": "x", "depends_on": ["a"]}]}',
    ):
        headers = {
            "Content-Type": "application/yaml" if b":" in document[:6] else "application/json"
        }
        yield "POST", "/v1/workflows", {"content": document, "headers": headers}
    yield "POST", "/v1/agents", _json({"agent_id": "ok-agent", "description": "nul \u0000"})
    yield "POST", "/v1/workflows/nope/executions", _json({"inputs": {"n": 2**70}})
    for value in INCIDENT_PATH_VALUES:
        yield "GET", f"/v1/incidents/{value}", {}
        yield "POST", f"/v1/incidents/{value}/acknowledge", _json({})
    for headers in HEADERS:
        for method, path in (("GET", "/v1/runs"), ("POST", f"/v1/runs/{run}/admissions")):
            yield method, path, _json({"step_index": 1}, headers)
    rng = random.Random(SEED)
    for name, (base, fields) in BODIES.items():
        for _ in range(RANDOM_CASES_PER_OPERATION):
            method, path = rng.choice(targets[name])
            field = rng.choice([*fields, "unknown"])
            body = _random_json(rng) if rng.random() < 0.1 else {**base, field: _random_json(rng)}
            yield method, path, _json(body)


def test_bad_inputs_of_every_kind_get_a_4xx_never_a_5xx(whole_system: RunningSystem) -> None:
    tenant, key = _tenant_with_an_incident(whole_system, "bad")
    mc = MissionControlClient(whole_system.gateway_url, key, timeout=30)
    run = mc.start_run(agent_id="a" * MAX_AGENT_ID).run_id
    finished = mc.start_run(agent_id="fuzzed-agent").run_id
    mc.finish_run(finished, status="completed")
    incident = mc.incidents()["incidents"][0]["incident_id"]
    cases = list(_requests(run, finished, incident))
    statuses: collections.Counter[int] = collections.Counter()
    server_errors: list[tuple[str, str, int, str]] = []
    off_shape: list[tuple[str, str, int]] = []

    async def send_all() -> None:
        limit = asyncio.Semaphore(6)
        async with httpx.AsyncClient(
            base_url=whole_system.gateway_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as http:

            async def send(method: str, path: str, kwargs: dict[str, Any]) -> None:
                async with limit:
                    response = await http.request(method, path, **kwargs)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append((method, path, response.status_code, response.text[:300]))
                elif response.status_code >= 400 and set(response.json()) != {"error"}:
                    off_shape.append((method, path, response.status_code))

            await asyncio.gather(*(send(m, p, kw) for m, p, kw in cases))

    asyncio.run(send_all())
    refused = sum(n for status, n in statuses.items() if 400 <= status < 500)
    _record(
        whole_system,
        "bad-inputs",
        {
            "tenant": tenant,
            "requests": len(cases),
            "refused_4xx": refused,
            "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": len(server_errors),
        },
    )
    assert server_errors == []
    assert off_shape == []
    assert sum(statuses.values()) == len(cases)
