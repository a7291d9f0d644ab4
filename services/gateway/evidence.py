"""Evidence routes: SOC2 evidence, executive debriefs, compliance attestations
(docs/evidence.md).

audit-replay builds each document from the event store and signs it, and answers it whole (the
RPC layer carries an answer larger than a NATS message in parts); these routes return it as a
file.
The signature statement comes back in ``X-Evidence-Signature`` (base64 of its JSON: save it as
``FILE.sig`` beside the file); a JSON document carries it inside as well.

SOC2 evidence of a long period is also built as a job (``/v1/evidence/soc2/jobs``): started with
a POST, polled for its progress (the period's events read of the total), then downloaded a part
at a time with the same headers.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' dependency annotations,
# which are local to evidence_routes.
import base64
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from libs.contracts.limits import UUID_PATTERN
from services.gateway.exports import job_parts

# Long documents: the audit service reads a whole period of the log and renders it.
DOCUMENT_TIMEOUT_S = 120.0
SIGNATURE_HEADER = "X-Evidence-Signature"
SHA256_HEADER = "X-Evidence-Sha256"

Soc2Format = Literal["pdf", "json", "csv"]
DebriefFormat = Literal["md", "html", "pdf", "json"]
From = Annotated[
    AwareDatetime,
    Query(alias="from", description="Start of the period (ISO 8601 with a time zone), included."),
]
To = Annotated[
    AwareDatetime,
    Query(description="End of the period (ISO 8601 with a time zone), excluded."),
]


class SignatureStatement(BaseModel):
    """What a document's ed25519 signature covers (libs/evidence_signing.py)."""

    model_config = ConfigDict(extra="allow")

    document: str
    format: str
    tenant_id: str
    generated_at: str
    as_of_position: int
    sha256: str
    checkpoint: dict[str, Any] | None
    algorithm: str
    key_id: str
    public_key: str
    signature: str


class SignedDocument(BaseModel):
    """A JSON evidence document with its signature statement."""

    evidence: dict[str, Any]
    signature: SignatureStatement


def _file_responses(*types: str) -> dict[int | str, dict[str, Any]]:
    # application/json is the model's (a signed document); the other types are files.
    content: dict[str, Any] = {
        t: {"schema": {"type": "string", "format": "binary"}}
        for t in types
        if t != "application/json"
    }
    return {
        200: {
            "model": SignedDocument,
            "description": "The signed document as a file (JSON: the document and its signature; "
            f"other formats: the signature statement in `{SIGNATURE_HEADER}`, base64 JSON).",
            "content": content,
            "headers": {
                SIGNATURE_HEADER: {"schema": {"type": "string"}},
                SHA256_HEADER: {"schema": {"type": "string"}},
            },
        }
    }


async def fetch_document(call: Any, method: str, payload: dict[str, Any]) -> Response:
    """The document ``audit.<method>`` makes, as a downloadable file."""
    answer = await call("audit", method, payload, timeout=DOCUMENT_TIMEOUT_S)
    return Response(
        base64.b64decode(answer["body_b64"]),
        media_type=str(answer["content_type"]),
        headers=_signed_headers(answer),
    )


def _period(start: Any, end: Any) -> dict[str, str]:
    return {"from": start.isoformat(), "to": end.isoformat()}


def _signed_headers(document: dict[str, Any]) -> dict[str, str]:
    """A document's download headers: its name, signature statement and sha256."""
    statement = base64.b64encode(orjson.dumps(document["signature"])).decode()
    return {
        "Content-Disposition": f'attachment; filename="{document["filename"]}"',
        SIGNATURE_HEADER: statement,
        SHA256_HEADER: str(document["sha256"]),
    }


class EvidenceJobIn(BaseModel):
    """What SOC2 evidence to build: a period and a format."""

    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime = Field(alias="from", description="Start of the period, included.")
    to: AwareDatetime = Field(description="End of the period, excluded.")
    format: Soc2Format = "pdf"


class EvidencePeriod(BaseModel):
    """A job's period, ``[from, to)``."""

    model_config = ConfigDict(populate_by_name=True)

    start: str = Field(alias="from")
    to: str


class EvidenceProgress(BaseModel):
    """The period's events read of those the document is made from."""

    done: int
    total: int


class EvidenceJob(BaseModel):
    """A SOC2 evidence job: ``queued``, ``running``, ``done`` (download it) or ``failed``
    (``error`` says why). It is pinned when started: the store position read up to."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    period: EvidencePeriod
    format: Soc2Format
    as_of_position: int
    requested_by: str
    progress: EvidenceProgress
    bytes: int
    attempts: int
    filename: str | None
    sha256: str | None
    error: str | None
    created_at: str
    updated_at: str


EvidenceJobIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="The evidence job's id.")]


class AttestationIn(BaseModel):
    """What to attest: a standard and a period."""

    model_config = ConfigDict(extra="forbid")

    standard: Literal["soc2", "iso27001"]
    start: AwareDatetime = Field(alias="from", description="Start of the period, included.")
    to: AwareDatetime = Field(description="End of the period, excluded.")


class AttestationRecord(BaseModel):
    """A generated attestation as its ``evidence.attestation_generated`` event records it."""

    attestation_id: str
    standard: Literal["soc2", "iso27001"]
    period_from: str
    period_to: str
    as_of_position: int
    generated_at: str
    json_sha256: str
    pdf_sha256: str
    key_id: str
    checkpoint_seq: int | None
    requested_by: str
    event_id: str


class AttestationList(BaseModel):
    """The tenant's attestation history, newest first."""

    attestations: list[AttestationRecord]


AttestationIdPath = Annotated[
    str, Path(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]


def evidence_routes(router: APIRouter, evidence: Any, attest: Any) -> None:
    """Add the evidence routes to ``router``; ``evidence`` and ``attest`` are the callers of the
    evidence and attest permissions."""
    Evidence = Annotated[Any, Depends(evidence)]
    Attest = Annotated[Any, Depends(attest)]
    tags: list[str | Any] = ["evidence"]

    @router.post("/attestations", response_model=AttestationRecord, status_code=201, tags=tags)
    async def create_attestation(body: AttestationIn, call: Attest) -> Any:
        """Generate a compliance attestation (SOC 2 or ISO 27001) of a period: policy digests
        and their signatures, promotion approvals and their diffs, exceptions and their expiry,
        the freeze history and proofs of enforcement. It is recorded as an event (the history);
        download it with `GET /v1/attestations/{attestation_id}`."""
        payload = {
            "standard": body.standard,
            **_period(body.start, body.to),
            "actor": call.actor,
        }
        return await call("audit", "attest", payload, timeout=DOCUMENT_TIMEOUT_S)

    @router.get("/attestations", response_model=AttestationList, tags=tags)
    async def list_attestations(call: Evidence) -> Any:
        """The tenant's attestations, newest first."""
        return await call.answer("audit", "attestations")

    @router.get(
        "/attestations/{attestation_id}",
        tags=tags,
        response_class=Response,
        responses=_file_responses("application/pdf", "application/json"),
    )
    async def get_attestation(
        attestation_id: AttestationIdPath, call: Evidence, format: Literal["pdf", "json"] = "pdf"
    ) -> Response:
        """A recorded attestation's file, generated again from what it recorded (the same
        bytes: its sha256 is the recorded one, else 409)."""
        payload = {"attestation_id": attestation_id, "format": format}
        return await fetch_document(call, "attestation", payload)

    @router.get(
        "/evidence/soc2",
        tags=tags,
        response_class=Response,
        responses=_file_responses("application/pdf", "text/csv", "application/json"),
    )
    async def soc2_evidence(
        call: Evidence, start: From, to: To, format: Soc2Format = "pdf"
    ) -> Response:
        """The tenant's SOC2 evidence for a period, control by control (CC6.1, CC6.2/6.3, CC7.2,
        CC7.3/7.4, CC8.1), every figure traceable to event ids; signed, with the event store's
        newest signed checkpoint. Verify it offline with `mctl verify-evidence FILE`. Built
        within the request: for long periods start it as a job (`POST
        /v1/evidence/soc2/jobs`), which shows its progress."""
        return await fetch_document(call, "evidence_soc2", {**_period(start, to), "format": format})

    @router.post("/evidence/soc2/jobs", response_model=EvidenceJob, status_code=202, tags=tags)
    async def create_soc2_job(body: EvidenceJobIn, call: Evidence) -> Any:
        """Build a period's SOC2 evidence in the background (for long periods of busy tenants,
        where `GET /v1/evidence/soc2` would keep the request open while the period's events are
        read and the document built). Poll `GET /v1/evidence/soc2/jobs/{job_id}` for its
        progress and download it from `.../download` once `done`; the job is pinned to the
        store's head when started."""
        payload = {**_period(body.start, body.to), "format": body.format}
        return await call.answer(
            "audit", "evidence_soc2_job_create", {**payload, "requested_by": call.actor}, 202
        )

    @router.get("/evidence/soc2/jobs/{job_id}", response_model=EvidenceJob, tags=tags)
    async def get_soc2_job(job_id: EvidenceJobIdPath, call: Evidence) -> Any:
        """A SOC2 evidence job's status and progress (the period's events read of the total)."""
        return await call.answer("audit", "evidence_soc2_job", {"job_id": job_id})

    @router.get(
        "/evidence/soc2/jobs/{job_id}/download",
        tags=tags,
        response_class=StreamingResponse,
        responses=_file_responses("application/pdf", "text/csv", "application/json"),
    )
    async def download_soc2_job(job_id: EvidenceJobIdPath, call: Evidence) -> Response:
        """A done job's signed document, as `GET /v1/evidence/soc2` answers it (signature
        statement in `X-Evidence-Signature`), streamed a part at a time (409 while not done)."""
        first, parts = await job_parts(
            call,
            "evidence_soc2_job_part",
            job_id,
            lambda part: base64.b64decode(part["data_b64"]),
        )
        document = first["document"]
        return StreamingResponse(
            parts,
            media_type=str(document["content_type"]),
            headers=_signed_headers(document),
        )

    @router.get(
        "/incidents/{incident_id}/debrief",
        tags=tags,
        response_class=Response,
        responses=_file_responses(
            "text/markdown", "text/html", "application/pdf", "application/json"
        ),
    )
    async def incident_debrief(
        incident_id: Annotated[UUID, Path(description="The incident's id.")],
        call: Evidence,
        format: DebriefFormat = "md",
    ) -> Response:
        """An executive debrief of one incident: what happened (timeline, inflection point),
        the impact (runs stopped, cost spent and prevented, time to detect, stop and resolve)
        and the recommended actions from the policy's runbook."""
        payload = {"incident_id": str(incident_id), "format": format}
        return await fetch_document(call, "debrief", payload)

    @router.get(
        "/debriefs",
        tags=tags,
        response_class=Response,
        responses=_file_responses(
            "text/markdown", "text/html", "application/pdf", "application/json"
        ),
    )
    async def period_debriefs(
        call: Evidence, start: From, to: To, format: DebriefFormat = "md"
    ) -> Response:
        """The executive debrief of every incident opened in a period (the first 100)."""
        return await fetch_document(call, "debriefs", {**_period(start, to), "format": format})
