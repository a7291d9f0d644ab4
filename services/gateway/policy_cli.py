"""``mctl policy``: test, check and format a bundle directory; sign, push and activate bundles.

``test``, ``check`` and ``fmt`` work offline on a directory, for policy authors (the logic is in
:mod:`libs.rego_tests` and :mod:`libs.rego_authoring`).

``sign`` works offline, for people without OPA: it packs a bundle directory into a tar.gz with
the ``.signatures.json`` ``opa build --signing-alg EdDSA`` would write. ``push`` and ``activate``
talk to the gateway (``--url``, else ``MC_GATEWAY_URL``, else the running system's) with an API
key or an admin's token (``--api-key``, ``MC_API_KEY``). See ``docs/policies.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from libs import rego_authoring, rego_tests
from libs.contracts.policy import ENVIRONMENTS
from libs.policy_bundles import sign_directory
from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, api_key_headers, gateway_url

policy_app = command_group(
    "policy", "Test, check and format policy bundles; sign, push and activate them."
)

# Uploads wait for the bundle's own tests, which may take a while.
UPLOAD_TIMEOUT_S = 60.0
# How often `simulate` asks for its job's progress, and how long it waits at most.
SIMULATION_POLL_S = 0.5
SIMULATION_WAIT_S = 3600.0

EnvironmentOption = Annotated[
    str,
    typer.Option("--environment", "-e", help=f"Which environment: {' or '.join(ENVIRONMENTS)}."),
]


DirectoryArgument = Annotated[Path, typer.Argument(help="The bundle directory (OPA layout).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _bundle_dir(directory: Path) -> Path:
    if not directory.is_dir():
        raise CliError(f"{str(directory)!r} is not a directory")
    return directory


def _environment(value: str) -> str:
    if value not in ENVIRONMENTS:
        raise CliError(f"--environment must be one of {', '.join(ENVIRONMENTS)}, not {value!r}")
    return value


ImmediateOption = Annotated[
    bool,
    typer.Option("--immediate", help="Switch every run at once (no canary; for an urgent fix)."),
]
CanaryPercentOption = Annotated[
    int | None,
    typer.Option("--canary-percent", min=1, max=100, help="The canary's share of runs (10)."),
]


def _activate(
    api: Api, digest: str, environment: str, immediate: bool, percent: int | None
) -> dict[str, Any]:
    path = f"/v1/policy-bundles/{digest}:activate"
    body: dict[str, Any] = {"immediate": immediate}
    if percent is not None:
        body["canary"] = {"percent": percent}
    answer: dict[str, Any] = api.send("POST", path, params={"environment": environment}, json=body)
    return answer


@policy_app.command("sign")
@one_line_errors
def sign(
    directory: Annotated[Path, typer.Argument(help="The bundle directory (OPA layout).")],
    key: Annotated[Path, typer.Option("--key", help="The ed25519 private key (PEM).")],
    key_id: Annotated[str, typer.Option("--key-id", help="The key's id (the JWT kid).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the tar.gz.")
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Set the manifest's revision (dot-separated integers)."),
    ] = None,
) -> None:
    """Pack DIRECTORY into a signed bundle (tar.gz with .signatures.json)."""
    target = output or Path(f"{directory.resolve().name}.tar.gz")
    digest = sign_directory(directory, key.read_bytes(), key_id, target, revision=revision)
    typer.echo(f"{target}  {digest}")


@policy_app.command("push")
@one_line_errors
def push(
    file: Annotated[Path, typer.Argument(help="The signed bundle (tar.gz).")],
    environment: EnvironmentOption = "production",
    activate: Annotated[
        bool, typer.Option("--activate", help="Activate it (by its digest) once uploaded.")
    ] = False,
    immediate: ImmediateOption = False,
    canary_percent: CanaryPercentOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Upload a signed bundle; with --activate, activate it by the digest the server computed."""
    env = _environment(environment)
    headers = api_key_headers(api_key)
    with Api(gateway_url(url, data_dir), headers, timeout=UPLOAD_TIMEOUT_S) as api:
        stored: dict[str, Any] = api.send(
            "POST", "/v1/policy-bundles", params={"environment": env}, content=file.read_bytes()
        )
        if activate:
            stored = _activate(api, stored["bundle_digest"], env, immediate, canary_percent)
    typer.echo(json.dumps(stored, indent=2))


@policy_app.command("activate")
@one_line_errors
def activate_bundle(
    digest: Annotated[str, typer.Argument(help="The bundle's digest, sha256:<hex>.")],
    environment: EnvironmentOption = "production",
    immediate: ImmediateOption = False,
    canary_percent: CanaryPercentOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Activate an uploaded bundle by its digest: as a canary (10 % of runs unless
    --canary-percent), or --immediate."""
    env = _environment(environment)
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        answer = _activate(api, digest, env, immediate, canary_percent)
        typer.echo(json.dumps(answer, indent=2))


@policy_app.command("simulate")
@one_line_errors
def simulate(
    digest: Annotated[str, typer.Option("--digest", help="The candidate's digest, sha256:<hex>.")],
    since: Annotated[str, typer.Option("--since", help="The window's start (ISO 8601, a zone).")],
    until: Annotated[str, typer.Option("--until", help="The window's end (excluded).")],
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only this agent's decisions.")
    ] = None,
    environment: EnvironmentOption = "production",
    output_format: Annotated[
        str, typer.Option("--format", help="How to print the report: json or csv.")
    ] = "json",
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Simulate an uploaded bundle on the decisions of [--since, --until): which would flip,
    which runs would have stopped at which step, and the cost prevented, per policy.

    Starts the job, shows its progress on stderr while waiting, then prints the report.
    """
    if output_format not in ("json", "csv"):
        raise CliError(f"--format must be json or csv, not {output_format!r}")
    body = {
        "bundle_digest": digest,
        "since": since,
        "until": until,
        "environment": _environment(environment),
    }
    if agent is not None:
        body["agent_id"] = agent
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        job: dict[str, Any] = api.send("POST", "/v1/policy-simulations", json=body)
        path = f"/v1/policy-simulations/{job['simulation_id']}"
        deadline = time.monotonic() + SIMULATION_WAIT_S
        shown = None
        while job["status"] in ("queued", "running"):
            progress = job.get("progress") or {}
            line = (
                f"{job['status']}: {progress.get('decisions', 0):,} decisions, "
                f"{float(progress.get('fraction', 0)):.0%} of the window"
            )
            if line != shown:
                typer.echo(line, err=True)
                shown = line
            if time.monotonic() > deadline:
                raise CliError(f"the simulation is still {job['status']}; see GET {path}")
            time.sleep(SIMULATION_POLL_S)
            job = api.send("GET", path)
        if job["status"] == "failed":
            raise CliError(f"the simulation failed: {job.get('error')}")
        if output_format == "csv":
            response = api.http.get(path, params={"format": "csv"})
            if not response.is_success:
                raise CliError(f"GET {path}: {response.status_code} {response.text[:200]}")
            typer.echo(response.text, nl=False)
        else:
            typer.echo(json.dumps(job["report"], indent=2))


@policy_app.command("test")
@one_line_errors
def run_tests(directory: DirectoryArgument, as_json: JsonOption = False) -> None:
    """Run the bundle's Rego tests offline; exit 1 when any fails.

    Every test_* rule of every *_test.rego, evaluated by regopy as policy-admission does.
    """
    with rego_authoring.engine_output_silenced():
        results = rego_tests.run(_bundle_dir(directory))
    failed = [r for r in results if not r.passed]
    if as_json:
        tests = [
            {"name": r.test.name, "file": r.test.file, "passed": r.passed, "detail": r.detail}
            for r in results
        ]
        summary = {"passed": len(results) - len(failed), "failed": len(failed)}
        typer.echo(json.dumps({"tests": tests, **summary}, indent=2))
    else:
        for r in results:
            line = f"{'PASS' if r.passed else 'FAIL'}  {r.test.name}  ({r.test.file})"
            typer.echo(line if r.passed else f"{line}\n      {r.detail[:500]}")
        typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        if not results and not as_json:
            typer.echo("no tests found (test_* rules in *_test.rego files)", err=True)
        raise typer.Exit(1)


@policy_app.command("check")
@one_line_errors
def check(
    directory: DirectoryArgument,
    require_tests: Annotated[
        bool, typer.Option("--require-tests", help="Exit 1 when a policy has no tests.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Compile every .rego, check the layout and report which policies have tests.

    Exit 1 on a compile error (file:line: message), an invalid data.json or a package outside
    the manifest's roots, and with --require-tests on a policy without tests.
    """
    root = _bundle_dir(directory)
    modules = rego_authoring.read_modules(root)
    data = root / rego_authoring.DATA_FILE
    data_json = data.read_text(encoding="utf-8") if data.is_file() else None
    problems = rego_authoring.layout_problems(root, modules)
    with rego_authoring.engine_output_silenced():
        errors = rego_authoring.compile_errors(modules, None if problems else data_json)
    report = rego_authoring.coverage(modules)
    missing = rego_authoring.untested(report)
    if as_json:
        doc = {
            "compile_errors": [str(e) for e in errors],
            "layout_problems": problems,
            "coverage": [
                {
                    "file": p.path,
                    "package": p.package,
                    "library": p.library,
                    "tests": p.tests,
                    "test_files": list(p.test_files),
                }
                for p in report
            ],
            "untested": [p.path for p in missing],
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        for line in [*map(str, errors), *problems]:
            typer.echo(f"error: {line}")
        counts = f"{len(errors)} compile errors, {len(problems)} layout problems"
        typer.echo(f"{len(modules)} modules, {counts}")
        typer.echo("coverage:")
        for p in report:
            kind = "library" if p.library else "policy"
            none = "no tests of its own" if p.library else "NO TESTS"
            tested = f"{p.tests} tests ({', '.join(p.test_files)})" if p.tests else none
            typer.echo(f"  {p.path}  {p.package}  [{kind}]  {tested}")
        with_tests = len([p for p in report if not p.library]) - len(missing)
        typer.echo(f"{with_tests} of {with_tests + len(missing)} policies have tests")
        for p in missing:
            typer.echo(f"untested: {p.path} ({p.package})")
    if errors or problems or (require_tests and missing):
        raise typer.Exit(1)


@policy_app.command("fmt")
@one_line_errors
def fmt(
    directory: DirectoryArgument,
    check_only: Annotated[
        bool, typer.Option("--check", help="Change nothing; list the files and exit 1.")
    ] = False,
) -> None:
    """Normalise the whitespace of every .rego (not opa fmt: expressions are left as written).

    Tab indentation, no trailing whitespace, at most one blank line in a row, one final newline.
    """
    root = _bundle_dir(directory)
    if check_only:
        changed = rego_authoring.needs_formatting(root)
        for rel in changed:
            typer.echo(f"would reformat {rel}")
        if changed:
            raise typer.Exit(1)
        return
    for rel in rego_authoring.format_directory(root):
        typer.echo(f"reformatted {rel}")
