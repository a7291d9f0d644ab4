"""The NATS subject scheme, in one place.

* Events: ``mc.evt.<tenant>.<aggregate>.<fact>``, e.g. ``mc.evt.acme.run.step_recorded``. The tenant
  is always the third token, so ``mc.evt.acme.>`` is one tenant's whole history and
  ``mc.evt.*.run.>`` is every tenant's run events. Tenant ids cannot contain ``.``, ``*`` or ``>``.
* Dead letters: ``mc.dlq.<consumer>``.
* Requests: ``mc.rpc.<service>.<method>`` (core NATS request–reply, queue group per service).
* Replies and fetched messages: a process's own inbox, ``_INBOX.<nats user>.<unique>`` when it
  connects as a user (``_INBOX.<unique>`` otherwise).
* Work: ``mc.work.<tenant>.<agent>``, the dispatched steps of workflow executions waiting for
  the agent's workers (the ``MC_WORK`` work-queue stream).
* Live telemetry: ``mc.live.<tenant>.<execution>.<run>``, the usage a worker streams while a
  step runs (the ``MC_LIVE`` stream, kept an hour). ``<execution>`` is ``_`` for a run that is no
  workflow step, and ``.`` in a run id is written ``%2E`` (run ids never contain ``%``), so
  ``mc.live.acme.*.<run>`` is one run's progress and ``mc.live.acme.<execution>.*`` one
  execution's. Progress is for viewers; the recorded step stays the system of record.
"""

from __future__ import annotations

EVENTS_STREAM = "MC_EVENTS"
EVENTS_PREFIX = "mc.evt"
DLQ_STREAM = "MC_DLQ"
DLQ_PREFIX = "mc.dlq"
RPC_PREFIX = "mc.rpc"
INBOX_PREFIX = "_INBOX"
WORK_STREAM = "MC_WORK"
WORK_PREFIX = "mc.work"
LIVE_STREAM = "MC_LIVE"
LIVE_PREFIX = "mc.live"
NO_EXECUTION = "_"


def event_subject(tenant_id: str, event_type: str) -> str:
    """Subject an event is published on."""
    return f"{EVENTS_PREFIX}.{tenant_id}.{event_type}"


def events_filter(event_type: str = ">", tenant_id: str = "*") -> str:
    """A consumer filter: one event type (or ``>``), one tenant (or ``*`` for all)."""
    return f"{EVENTS_PREFIX}.{tenant_id}.{event_type}"


def dlq_subject(consumer: str) -> str:
    """Where a consumer's poison messages go."""
    return f"{DLQ_PREFIX}.{consumer}"


def rpc_subject(service: str, method: str) -> str:
    """Subject of a request handled by ``service``."""
    return f"{RPC_PREFIX}.{service}.{method}"


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a process connected as NATS ``user``: only that user may subscribe
    under it, so nobody else can read the replies it receives."""
    return f"{INBOX_PREFIX}.{user}"


def work_subject(tenant_id: str, agent_id: str) -> str:
    """Where the dispatched steps of ``agent_id`` in ``tenant_id`` wait for a worker."""
    return f"{WORK_PREFIX}.{tenant_id}.{agent_id}"


def live_token(run_or_execution_id: str) -> str:
    """A run or execution id as one subject token (``.`` becomes ``%2E``; ids never hold ``%``)."""
    return run_or_execution_id.replace(".", "%2E")


def live_subject(tenant_id: str, execution_id: str | None, run_id: str) -> str:
    """Where the streamed usage of ``run_id`` (an attempt of ``execution_id``, or none) goes."""
    scope = live_token(execution_id) if execution_id else NO_EXECUTION
    return f"{LIVE_PREFIX}.{tenant_id}.{scope}.{live_token(run_id)}"


def live_filter(
    tenant_id: str, *, run_id: str | None = None, execution_id: str | None = None
) -> str:
    """The live subjects of one run, or of every attempt of one execution."""
    if run_id is not None:
        return f"{LIVE_PREFIX}.{tenant_id}.*.{live_token(run_id)}"
    assert execution_id is not None
    return f"{LIVE_PREFIX}.{tenant_id}.{live_token(execution_id)}.*"
