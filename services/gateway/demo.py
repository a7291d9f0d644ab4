"""The demo: one scripted agent against the public API, ending in a run stopped by policy, then
a workflow served by the example worker (:mod:`services.gateway.demo_workflow`).

It reproduces the core flow of the product: policies exist (the bundle's defaults: at most 10,000
tokens per run, at most $10 per run) → runs start → run C asks to run a step that would take it to
15,000 tokens → admission denies it naming ``token_limit`` → the agent stops → the run shows
``stopped_by_policy`` at step 3 and an incident is open. Then one execution of a five-step
workflow with a parallel branch runs: its irreversible step waits until the demo's approver
approves it, its budget alerts at 80 %, and the token counts of its model calls are printed as
they stream.

    python -m services.gateway.demo --base-url http://127.0.0.1:PORT --data-dir var/mc

``mctl up --demo`` calls :func:`run_demo` once the system is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from libs.runtime.cli_support import admin_database
from services.gateway.client import ApiError, MissionControlClient
from services.gateway.demo_workflow import (
    WorkflowOutcome,
    ensure_people,
    logged_events,
    run_workflow,
)
from services.gateway.demo_workflow import summary as workflow_summary
from services.gateway.evidence_cli import download
from services.gateway.keys import provision_tenant, run_with_pool

DEMO_TENANT = "demo"
AGENT_ID = "code-review-agent"
MODEL = "gpt-4o"
# Custom demo prices (USD per token), published only when the tenant has no price for MODEL.
DEMO_PRICE = {"model": MODEL, "input_per_token": "0.0000025", "output_per_token": "0.00001"}
WAIT_S = 60.0
POLL_S = 0.25


@dataclass(frozen=True)
class Step:
    """One scripted step: what the agent estimates and what it then reports."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Script:
    """A scripted run: its steps, whether it then finishes, and the step admission should deny."""

    label: str
    steps: tuple[Step, ...]
    finish: bool
    denied_step: Step | None = None


SCRIPTS = (
    # A: 8,000 tokens in three steps, then completed.
    Script("A", (Step(2000, 700), Step(2500, 800), Step(1500, 500)), finish=True),
    # B: 5,000 tokens in two steps, still running.
    Script("B", (Step(2000, 500), Step(2000, 500)), finish=False),
    # C: 500 + 5,000 tokens, then a step estimated at 9,500 tokens: 15,000 > 10,000.
    Script("C", (Step(400, 100), Step(4000, 1000)), finish=False, denied_step=Step(8000, 1500)),
)


def wait_for(what: str, probe: Callable[[], Any], deadline: float) -> Any:
    """Poll ``probe`` until it returns something truthy, or fail naming ``what``."""
    while True:
        try:
            value = probe()
        except ApiError as exc:
            # The projections may not have the run yet: 404 until they catch up.
            if exc.status != 404:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo waited {WAIT_S:.0f}s for {what}")
        time.sleep(POLL_S)


def drive(mc: MissionControlClient, script: Script, run_id: str) -> dict[str, Any]:
    """Run one scripted agent: admission before every step, then record it."""
    mc.start_run(AGENT_ID, run_id=run_id, labels={"demo": script.label})
    index = 0
    for index, step in enumerate(script.steps, start=1):
        decision = mc.admit(
            run_id,
            index,
            model=MODEL,
            input_tokens=step.input_tokens,
            max_output_tokens=step.output_tokens,
        )
        if decision.outcome == "deny":
            raise RuntimeError(f"run {script.label} step {index} was denied unexpectedly")
        mc.record_step(
            run_id,
            index,
            model=MODEL,
            input_tokens=step.input_tokens,
            output_tokens=step.output_tokens,
            duration_ms=1200.0,
            input={"prompt": f"review chunk {index}"},
            output={"comments": index},
        )
    outcome: dict[str, Any] = {}
    if script.denied_step is not None:
        step = script.denied_step
        decision = mc.admit(
            run_id,
            index + 1,
            model=MODEL,
            input_tokens=step.input_tokens,
            max_output_tokens=step.output_tokens,
        )
        if decision.outcome != "deny" or "token_limit" not in {
            r.policy_id for r in decision.reasons
        }:
            raise RuntimeError(
                f"run {script.label} step {index + 1}: expected a token_limit "
                f"denial, admission said {decision.outcome}"
            )
        outcome = decision.model_dump()
        # The agent obeys: a denied step is not run, and the agent stops here.
    if script.finish:
        mc.finish_run(run_id, "completed")
    return outcome


def ensure_prices(mc: MissionControlClient) -> None:
    """Give MODEL a price unless the tenant's table already has one, so costs are not unpriced."""
    if not any(p.get("model") == MODEL for p in mc.prices().get("prices", [])):
        mc.set_prices([DEMO_PRICE])


def say(line: str) -> None:
    """Print a line at once, also when the output goes to a file or a pipe."""
    print(line, flush=True)


def run_demo(
    base_url: str,
    data_dir: Path,
    *,
    admin_database_url: str | None = None,
    api_key: str | None = None,
    echo: Callable[[str], None] = say,
) -> WorkflowOutcome:
    """Provision tenant ``demo`` (and a key), run the scripted agent and the workflow, and print
    what happened."""
    url = admin_database(admin_database_url, data_dir.resolve()).secret()
    if api_key is None:
        created, api_key = run_with_pool(
            url,
            lambda pool: provision_tenant(
                pool, DEMO_TENANT, "Demo Organization", exist_ok=True, key_name="demo"
            ),
        )
        echo(f"tenant {DEMO_TENANT!r} {'created' if created else 'exists'}; issued a new API key")
    suffix = uuid.uuid4().hex[:8]
    run_ids = {s.label: f"demo-{s.label.lower()}-{suffix}" for s in SCRIPTS}
    with MissionControlClient(base_url, api_key, timeout=30.0) as mc:
        ensure_prices(mc)
        denial: dict[str, Any] = {}
        for script in SCRIPTS:
            outcome = drive(mc, script, run_ids[script.label])
            denial = outcome or denial
        deadline = time.monotonic() + WAIT_S
        run_c = run_ids["C"]
        wait_for(
            "run C to show stopped_by_policy at step 3",
            lambda: mc.run(run_c).get("stopped_at_step") == 3,
            deadline,
        )
        [incident] = wait_for(
            "the incident of run C",
            lambda: mc.incidents(run_id=run_c)["incidents"],
            deadline,
        )
        # Projections and costs arrive over the bus; wait until every run is fully costed.
        runs = wait_for(
            "every run to be projected and costed",
            lambda: _settled({label: mc.run(rid) for label, rid in run_ids.items()}),
            deadline,
        )
        trace = mc.trace(run_c)
    echo(summary(base_url, api_key, run_ids, runs, denial, incident, trace))
    soc2, debrief = write_evidence(base_url, api_key, data_dir.resolve(), incident["incident_id"])
    echo(f"SOC2 evidence PDF: {soc2}  (signature: {soc2}.sig; mctl verify-evidence {soc2})")
    echo(f"Debrief of run C's incident: {debrief}")
    echo("")
    return run_workflow_part(base_url, api_key, url, data_dir.resolve(), echo)


def write_evidence(
    base_url: str, api_key: str, data_dir: Path, incident_id: str
) -> tuple[Path, Path]:
    """The tenant's SOC2 evidence of the last day as a signed PDF, and the debrief of the
    stopped run's incident as Markdown (and PDF), under ``<data dir>/demo``."""
    folder = data_dir / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    period = {
        "from": (now - timedelta(days=1)).isoformat(),
        "to": (now + timedelta(minutes=5)).isoformat(),
    }
    soc2 = download(
        base_url,
        api_key,
        data_dir,
        "/v1/evidence/soc2",
        {**period, "format": "pdf"},
        folder / "soc2-evidence.pdf",
    )
    path = f"/v1/incidents/{incident_id}/debrief"
    debrief = download(
        base_url, api_key, data_dir, path, {"format": "md"}, folder / f"debrief-{incident_id}.md"
    )
    download(
        base_url, api_key, data_dir, path, {"format": "pdf"}, folder / f"debrief-{incident_id}.pdf"
    )
    return soc2, debrief


def run_workflow_part(
    base_url: str, api_key: str, database_url: str, data_dir: Path, echo: Callable[[str], None]
) -> WorkflowOutcome:
    """The workflow demo: its people, the execution, and the event log's account of it."""
    echo("A workflow: five steps with a parallel branch, an approval and a budget alert")
    echo("")
    people_file = data_dir / "demo" / "people.json"
    people = run_with_pool(database_url, lambda pool: ensure_people(pool, DEMO_TENANT, people_file))
    for person in people.values():
        echo(f"person user:{person.user_id} holds {person.role} in {DEMO_TENANT!r}")
    echo(f"(their passwords are in {people_file}, to sign in at POST /v1/auth/token)")
    outcome = asyncio.run(run_workflow(base_url, api_key, DEMO_TENANT, people, echo))
    outcome.log = run_with_pool(
        database_url, lambda pool: logged_events(pool, DEMO_TENANT, outcome.execution_id)
    )
    echo(workflow_summary(outcome, base_url, api_key))
    return outcome


def _settled(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    expected = {s.label: len(s.steps) for s in SCRIPTS}
    done = all(
        run.get("last_step_index") == expected[label] and run.get("cost_usd") is not None
        for label, run in runs.items()
    )
    return runs if done and runs["A"].get("status") == "completed" else None


def summary(
    base_url: str,
    api_key: str,
    run_ids: dict[str, str],
    runs: dict[str, dict[str, Any]],
    denial: dict[str, Any],
    incident: dict[str, Any],
    trace: dict[str, Any],
) -> str:
    """The readable end of the demo."""
    lines = ["", "Mission Control demo", "=" * 20, ""]
    lines.append(f"{'run':<22} {'status':<18} {'steps':>5} {'tokens':>8} {'cost (USD)':>12}")
    for label, rid in run_ids.items():
        run = runs[label]
        lines.append(
            f"{rid:<22} {run['status']:<18} {run['last_step_index']:>5} "
            f"{run['tokens_used']:>8} {run['cost_usd'] or 'unpriced':>12}"
        )
    lines.append("")
    lines.append(f"Run C, step 3: admission said {denial.get('outcome')!r}")
    for r in denial.get("reasons", []):
        lines.append(f"  {r['policy_id']} ({r['severity']}): {r['message']}")
    lines.append(
        f"Incident {incident['incident_id']}: severity {incident['severity']}, "
        f"status {incident['status']}, policy {incident['policy_id']}"
    )
    point = trace.get("inflection_point") or {}
    lines.append(
        f"Inflection point of run C: step {point.get('step_index')} "
        f"({point.get('policy_id')}: {point.get('reason')})"
    )
    auth = f"-H 'Authorization: Bearer {api_key}'"
    lines += [
        "",
        f"API key of tenant {DEMO_TENANT!r}: {api_key}",
        "",
        "Look around:",
        f"  curl {auth} {base_url}/v1/runs",
        f"  curl {auth} {base_url}/v1/runs/{run_ids['C']}/trace",
        f"  curl {auth} '{base_url}/v1/incidents?run_id={run_ids['C']}'",
        f"  curl {auth} {base_url}/v1/policies",
        f"  curl {auth} '{base_url}/v1/costs?group_by=run'",
        f"  curl {auth} '{base_url}/v1/runs/{run_ids['C']}/export?format=csv'",
        f"  OpenAPI: {base_url}/openapi.json   docs: {base_url}/docs",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m services.gateway.demo``."""
    parser = argparse.ArgumentParser(prog="python -m services.gateway.demo")
    parser.add_argument("--base-url", required=True, help="The gateway's URL.")
    parser.add_argument("--data-dir", type=Path, default=Path("var/mc"))
    parser.add_argument("--admin-database-url", default=None)
    parser.add_argument("--api-key", default=None, help="Use this key instead of issuing one.")
    args = parser.parse_args(argv)
    run_demo(
        args.base_url.rstrip("/"),
        args.data_dir,
        admin_database_url=args.admin_database_url,
        api_key=args.api_key,
    )


if __name__ == "__main__":
    main()
