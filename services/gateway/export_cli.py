"""``mctl export``: full exports of runs and workflow executions, built as jobs by the server.

``mctl export run RUN_ID -o FILE`` (or ``execution``) starts a job, shows a progress bar (events
written of the total) while it polls the job, then downloads the file; ``mctl verify-export
FILE`` checks it offline. ``status`` and ``download`` act on a job started before.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from libs.contracts.limits import UUID_PATTERN
from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import (
    REQUEST_TIMEOUT_S,
    Api,
    ApiKeyOption,
    UrlOption,
    api_key_headers,
    gateway_url,
)

export_app = command_group(
    "export", "Export runs and workflow executions with their hashes and checkpoint proof."
)

POLL_S = 0.5
WAIT_S = 3600.0
# A download may take as long as it needs while bytes arrive; a gateway that goes silent this long
# mid-file is given up on, rather than hanging the command.
DOWNLOAD_IDLE_S = 60.0

OutputOption = Annotated[
    Path,
    typer.Option("--output", "-o", help="Where to write the export (NDJSON).", dir_okay=False),
]
WaitOption = Annotated[
    float, typer.Option("--wait", help="How long to wait for the job, in seconds.")
]


def _job_path(job_id: str) -> str:
    """``/v1/exports/{job_id}``, for a job id only: the path is never another route's (``..``)."""
    if not re.fullmatch(UUID_PATTERN, job_id):
        raise CliError(f"{job_id!r} is not an export job id (a UUID, as `mctl export` prints)")
    return f"/v1/exports/{job_id}"


def _download(api: Api, job_id: str, output: Path) -> int:
    """Stream a done job's file to ``output``; the bytes written."""
    path = f"{_job_path(job_id)}/download"
    written = 0
    partial = output.with_name(output.name + ".partial")
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=DOWNLOAD_IDLE_S)
    with api.http.stream("GET", path, timeout=timeout) as response:
        if not response.is_success:
            response.read()
            raise CliError(f"GET {path}: {response.status_code} {response.text[:200]}")
        try:
            with partial.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
                    written += len(chunk)
        except httpx.ReadTimeout:
            partial.unlink(missing_ok=True)
            raise CliError(
                f"GET {path}: the gateway sent nothing for {DOWNLOAD_IDLE_S:g} s after "
                f"{written} bytes; nothing was written (run `mctl export download` again)"
            ) from None
        except BaseException:
            # A download cut short leaves nothing behind: output only ever holds a whole file.
            partial.unlink(missing_ok=True)
            raise
    partial.replace(output)
    return written


def follow_job(api: Api, job: dict[str, Any], wait_s: float, path: str) -> dict[str, Any]:
    """Poll the job at ``path`` until it is done or failed, with a progress bar on stderr
    (its ``progress``: events done of the total)."""
    deadline = time.monotonic() + wait_s
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as bar:
        task = bar.add_task(job["status"], total=max(int(job["progress"]["total"]), 1))
        while job["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise CliError(f"the job is still {job['status']}; see GET {path}")
            time.sleep(POLL_S)
            job = api.send("GET", path)
            progress = job["progress"]
            bar.update(
                task,
                description=job["status"],
                completed=int(progress["done"]),
                total=max(int(progress["total"]), int(progress["done"]), 1),
            )
    return job


def _export(
    subject_type: str,
    subject_id: str,
    output: Path,
    wait_s: float,
    url: str | None,
    api_key: str | None,
    data_dir: Path | None,
) -> None:
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        job: dict[str, Any] = api.send(
            "POST", "/v1/exports", json={"subject_type": subject_type, "subject_id": subject_id}
        )
        typer.echo(f"export job {job['job_id']}", err=True)
        job = follow_job(api, job, wait_s, _job_path(job["job_id"]))
        if job["status"] == "failed":
            raise CliError(f"the export failed: {job.get('error')}")
        size = _download(api, job["job_id"], output)
    typer.echo(
        f"wrote {output} ({job['progress']['done']:,} events, {size:,} bytes, checkpoint "
        f"{job.get('checkpoint_seq')}); check it with `mctl verify-export {output}`"
    )


SubjectArgument = Annotated[
    str, typer.Argument(metavar="ID", help="The run's or the execution's id.")
]


def _subject_command(kind: str, doc: str) -> None:
    """Register ``mctl export <kind> ID -o FILE``."""

    def command(
        subject_id: SubjectArgument,
        output: OutputOption,
        wait_s: WaitOption = WAIT_S,
        url: UrlOption = None,
        api_key: ApiKeyOption = None,
        data_dir: DataDirOption = None,
    ) -> None:
        _export(kind, subject_id, output, wait_s, url, api_key, data_dir)

    command.__doc__ = doc
    command.__name__ = f"export_{kind}"
    export_app.command(kind)(one_line_errors(command))


_subject_command(
    "run",
    "Export a run (its run, decisions, cost and incident streams) with a progress bar.",
)
_subject_command(
    "execution",
    "Export a workflow execution and every run of its steps, with a progress bar.",
)


@export_app.command("status")
@one_line_errors
def status(
    job_id: Annotated[str, typer.Argument(help="The export job's id.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """An export job's status and progress."""
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        job = api.send("GET", _job_path(job_id))
    p = job["progress"]
    error = f" ({job['error']})" if job.get("error") else ""
    typer.echo(f"{job['job_id']} {job['status']}: {p['done']:,}/{p['total']:,} events{error}")


@export_app.command("download")
@one_line_errors
def download(
    job_id: Annotated[str, typer.Argument(help="The export job's id.")],
    output: OutputOption,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Download a done export job's file."""
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        size = _download(api, job_id, output)
    typer.echo(f"wrote {output} ({size:,} bytes)")
