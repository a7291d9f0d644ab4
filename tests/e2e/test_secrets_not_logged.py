"""No secret reaches any log file of a running system, even when requests fail every way they can.

Every request carries secrets: the tenant's real API key (as a bearer token and as ``X-API-Key``),
a database URL with a password and ``password=`` text in bodies, a JWT, a wrong operator token.
The test drives every failure it can reach on a live system, then reads every log file under the
data directory and finds none of the secrets:

* 4xx answers (401 for a wrong key or a JWT, 403, 404, 409, 413, 422);
* a 500 in the gateway: a broken service answers the gateway's request with bytes that are not
  JSON, so the gateway logs the traceback (which used to carry the key in its frames' locals);
* a 500 inside workflow-engine and inside incident: a request on the bus whose actor does not fit
  the envelope, so the handler fails building its event and logs the traceback and the
  validation error (which used to quote the payload);
* a 504: workflow-engine stopped (SIGSTOP) while the gateway waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from libs.contracts.subjects import rpc_subject
from libs.eventbus.jetstream import connect
from services.gateway.client import MissionControlClient
from services.gateway.domain import generate_key
from tests.e2e.conftest import RunningSystem, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = f"pw-{secrets.token_hex(12)}"
DSN = f"postgresql://mc:{PASSWORD}@db.internal:5432/missioncontrol"
ADMIN_GUESS = f"admin-{secrets.token_hex(12)}"
WRONG_KEY = generate_key().token
JWT = ".".join(
    base64.urlsafe_b64encode(part).rstrip(b"=").decode()
    for part in (
        b'{"alg":"HS256","typ":"JWT"}',
        orjson.dumps({"sub": "alice", "nonce": secrets.token_hex(8)}),
        secrets.token_bytes(32),
    )
)
# The actor of the events a request causes, when the caller names one; longer than an envelope
# holds, and carrying a secret, so a handler fails with the secret in hand.
TOO_LONG_ACTOR = f"user:{'x' * 200} {DSN}"


def _secret_body(**fields: Any) -> dict[str, Any]:
    return {"labels": {"dsn": DSN, "note": f"password={PASSWORD}"}, **fields}


def _gateway_answers(sys_: RunningSystem, key: str, run: str, incident: str) -> list[int]:
    """Every 4xx the API gives, each request carrying the key and secrets in its body."""
    statuses = []
    auth = {"Authorization": f"Bearer {key}"}
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/runs", auth, _secret_body(agent_id="a" * 195)),
        ("POST", "/v1/runs", {"X-API-Key": key}, _secret_body(agent_id="agent", run_id=run)),
        ("POST", "/v1/runs", {"Authorization": f"Bearer {WRONG_KEY}"}, _secret_body()),
        ("POST", "/v1/runs", {"Authorization": f"Bearer {JWT}"}, _secret_body(agent_id="a")),
        ("POST", "/v1/runs", {"X-API-Key": f"{PASSWORD}"}, _secret_body(agent_id="a")),
        ("POST", f"/v1/runs/{run}/steps", auth, {"step_index": 1, "input": {"dsn": DSN}}),
        ("POST", f"/v1/runs/{run}/steps", auth, {"step_index": 0, "error": DSN}),
        ("POST", f"/v1/runs/{run}/finish", auth, {"status": "done", "reason": DSN}),
        ("POST", f"/v1/incidents/{incident}/resolve", auth, {"resolution": DSN, "by": "b" * 196}),
        ("POST", "/v1/admin/rebuild-projections", {**auth, "X-Admin-Token": ADMIN_GUESS}, None),
        ("POST", "/v1/runs/no-such-run/finish", auth, {"status": "failed", "reason": DSN}),
    ]
    with httpx.Client(base_url=sys_.gateway_url, timeout=30) as http:
        for method, path, headers, body in requests:
            r = http.request(method, path, headers=headers, json=body)
            statuses.append(r.status_code)
        r = http.post(
            "/v1/runs",
            headers={**auth, "Content-Type": "application/json"},
            content=b'{"agent_id": "\xff", "password": "' + PASSWORD.encode() + b'"}',
        )
        statuses.append(r.status_code)
    return statuses


async def _gateway_500(sys_: RunningSystem, key: str) -> int:
    """Make audit-replay's ``policies`` answer garbage until the gateway fails on it (500)."""
    # As audit-replay's NATS user, in its queue group: the bus lets nobody else answer.
    nc = await connect(sys_.nats_url, "broken-audit", sys_.nats_credentials("audit-replay"))

    async def garbage(msg: Any) -> None:
        await msg.respond(b"\x00 not JSON " + DSN.encode())

    sub = await nc.subscribe(rpc_subject("audit", "policies"), queue="audit", cb=garbage)
    try:
        async with httpx.AsyncClient(base_url=sys_.gateway_url, timeout=30) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await http.get("/v1/policies", headers={"Authorization": f"Bearer {key}"})
                if r.status_code >= 500:
                    assert r.json()["error"]["code"] == "internal"
                    assert PASSWORD not in r.text
                    return r.status_code
        raise AssertionError("the gateway never took the broken answer")
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _service_500(sys_: RunningSystem, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request on the bus, as the gateway would send it, naming an actor that cannot be stored."""
    # As the gateway's NATS user: only the gateway may send requests.
    nc = await connect(sys_.nats_url, "too-long-actor", sys_.nats_credentials("gateway"))
    try:
        headers = {"Mc-Actor": TOO_LONG_ACTOR, "Authorization": f"Bearer {WRONG_KEY}"}
        msg = await nc.request(subject, orjson.dumps(body), timeout=30, headers=headers)
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply
    finally:
        await nc.close()


def _gateway_504(sys_: RunningSystem, key: str) -> int:
    """Stop workflow-engine while the gateway waits for it."""
    pid = int(sys_.child("workflow-engine")["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=sys_.gateway_url, timeout=60) as http:
            r = http.post(
                "/v1/runs",
                headers={"Authorization": f"Bearer {key}"},
                json=_secret_body(agent_id="stalled"),
            )
    finally:
        os.kill(pid, signal.SIGCONT)
    return r.status_code


def _open_incident(mc: MissionControlClient) -> tuple[str, str]:
    run = mc.start_run(agent_id="leaky-agent", labels={"dsn": DSN}).run_id
    denied = mc.admit(run, 1, model="gpt-4o", estimate={"input_tokens": 20_000})
    assert denied.outcome == "deny"
    found = wait_for(lambda: mc.incidents(run_id=run)["incidents"], 30, "the incident")
    return run, str(found[0]["incident_id"])


def _logs_mention(sys_: RunningSystem, needle: str) -> dict[str, int]:
    found = {}
    for path in sorted((sys_.data_dir / "logs").glob("*")):
        count = path.read_bytes().count(needle.encode())
        if count:
            found[path.name] = count
    return found


def test_no_secret_reaches_any_log_while_requests_fail_every_way(
    whole_system: RunningSystem,
) -> None:
    tenant = f"leak{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    mc = MissionControlClient(whole_system.gateway_url, key, timeout=30)
    run, incident = _open_incident(mc)

    statuses = _gateway_answers(whole_system, key, run, incident)
    assert all(400 <= s < 500 for s in statuses), statuses
    assert {401, 403, 404, 409, 422} <= set(statuses)

    assert asyncio.run(_gateway_500(whole_system, key)) == 500
    workflow = asyncio.run(
        _service_500(
            whole_system,
            rpc_subject("workflow", "start_run"),
            {"tenant_id": tenant, "agent_id": "leaky-agent", **_secret_body()},
        )
    )
    assert workflow["error"]["code"] == "internal", workflow
    ack = asyncio.run(
        _service_500(
            whole_system,
            rpc_subject("incident", "acknowledge"),
            {"tenant_id": tenant, "incident_id": incident, "by": f"password={PASSWORD}"},
        )
    )
    assert ack["error"]["code"] == "internal", ack
    assert _gateway_504(whole_system, key) == 504

    # The failures were logged where the test looks, with their tracebacks.
    def logged(text: str) -> dict[str, int]:
        return _logs_mention(whole_system, text)

    assert "gateway.log" in logged("gateway.unhandled_error")
    assert {"workflow-engine.log", "incident.log"} <= set(logged("rpc.handler_failed"))
    assert logged('"frames"')

    key_secret = key.split("_", 2)[2]
    for secret in (key_secret, PASSWORD, JWT, WRONG_KEY.split("_", 2)[2], ADMIN_GUESS):
        assert logged(secret) == {}, f"a secret was logged: {logged(secret)}"
