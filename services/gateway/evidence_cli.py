"""``mctl evidence`` and ``mctl debrief``: download signed evidence documents (docs/evidence.md).

``mctl evidence soc2`` starts the document as a job on the server and shows a progress bar (the
period's events read of the total) until it is done, then downloads it. They talk to the
gateway's HTTP API with an API key holding the ``read`` scope (``--api-key`` or
``$MC_API_KEY``). A JSON document carries its signature; any other file is written with its
signature statement beside it in ``FILE.sig``, which ``mctl verify-evidence FILE`` checks.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from libs.contracts.limits import UUID_PATTERN
from libs.evidence_signing import SIG_SUFFIX
from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import (
    Api,
    ApiKeyOption,
    UrlOption,
    api_key_headers,
    error_message,
    gateway_url,
)
from services.gateway.evidence import DOCUMENT_TIMEOUT_S, SIGNATURE_HEADER
from services.gateway.export_cli import WAIT_S, WaitOption, follow_job

evidence_app = command_group("evidence", "Download the tenant's signed SOC2 evidence.")
debrief_app = command_group("debrief", "Download executive debriefs of incidents.")

FromOption = Annotated[
    str, typer.Option("--from", help="Start of the period, ISO 8601 with a time zone.")
]
ToOption = Annotated[str, typer.Option("--to", help="End of the period (excluded).")]
OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Where to write the file (default: its own name here)."),
]


def write_document(response: httpx.Response, output: Path | None) -> Path:
    """Write a downloaded document (and ``FILE.sig`` for formats other than JSON)."""
    disposition = response.headers.get("content-disposition", "")
    name = disposition.split('filename="')[-1].rstrip('"') or "evidence"
    target = output or Path(Path(name).name)
    target.write_bytes(response.content)
    signature = response.headers.get(SIGNATURE_HEADER)
    if signature and target.suffix != ".json":
        target.with_name(target.name + SIG_SUFFIX).write_bytes(base64.b64decode(signature))
    return target


def _get(api: Api, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
    response = api.http.get(path, params=params)
    if not response.is_success:
        raise CliError(f"GET {path}: {response.status_code} {error_message(response)}")
    return response


def download(
    url: str | None,
    api_key: str | None,
    data_dir: Path | None,
    path: str,
    params: dict[str, Any],
    output: Path | None,
) -> Path:
    """Fetch one document and write it (and ``FILE.sig`` for formats other than JSON)."""
    base = gateway_url(url, data_dir)
    with Api(base, api_key_headers(api_key), timeout=DOCUMENT_TIMEOUT_S) as api:
        response = _get(api, path, params)
    return write_document(response, output)


@evidence_app.command("soc2")
@one_line_errors
def soc2(
    start: FromOption,
    end: ToOption,
    format: Annotated[str, typer.Option("--format", help="pdf, json or csv.")] = "pdf",
    output: OutputOption = None,
    wait_s: WaitOption = WAIT_S,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The tenant's SOC2 evidence for a period, control by control, signed: built by the
    server as a job, with a progress bar (events read of the total) while it runs."""
    body = {"from": start, "to": end, "format": format}
    base = gateway_url(url, data_dir)
    with Api(base, api_key_headers(api_key), timeout=DOCUMENT_TIMEOUT_S) as api:
        job: dict[str, Any] = api.send("POST", "/v1/evidence/soc2/jobs", json=body)
        job_id = str(job["job_id"])
        if not re.fullmatch(UUID_PATTERN, job_id):
            raise CliError(f"the gateway answered a job id that is not a UUID: {job_id[:80]!r}")
        typer.echo(f"evidence job {job_id}", err=True)
        path = f"/v1/evidence/soc2/jobs/{job_id}"
        job = follow_job(api, job, wait_s, path)
        if job["status"] == "failed":
            raise CliError(f"the evidence job failed: {job.get('error')}")
        response = _get(api, f"{path}/download")
    typer.echo(str(write_document(response, output)))


@debrief_app.command("incident")
@one_line_errors
def incident(
    incident_id: Annotated[str, typer.Argument(help="The incident's id.")],
    format: Annotated[str, typer.Option("--format", help="md, html, pdf or json.")] = "md",
    output: OutputOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """One incident's executive debrief: what happened, impact, recommended actions."""
    path = download(
        url,
        api_key,
        data_dir,
        f"/v1/incidents/{incident_id}/debrief",
        {"format": format},
        output,
    )
    typer.echo(str(path))


@debrief_app.command("period")
@one_line_errors
def period(
    start: FromOption,
    end: ToOption,
    format: Annotated[str, typer.Option("--format", help="md, html, pdf or json.")] = "md",
    output: OutputOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The debrief of every incident opened in a period."""
    params = {"from": start, "to": end, "format": format}
    path = download(url, api_key, data_dir, "/v1/debriefs", params, output)
    typer.echo(str(path))
