"""How the runtime finds the gateway (entry point ``mission_control.services``).

The gateway is the front door: it forwards every request to the other services, so it starts
after them. It also contributes ``mctl tenant``, ``mctl user``, ``mctl workflow``,
``mctl approval``, ``mctl policy``, ``mctl promotion``, ``mctl audit``, ``mctl export``,
``mctl evidence`` and ``mctl debrief``, and the demo ``mctl up --demo`` runs.
"""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="gateway",
    module="services.gateway",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_gateway",
    stream_categories=("tenant", "user", "api_key"),
    after=("audit-replay", "cost", "incident", "policy-admission", "workflow-engine"),
    demo="services.gateway.demo:run_demo",
    commands={
        "tenant": "services.gateway.cli:tenant_app",
        "user": "services.gateway.cli:user_app",
        "workflow": "services.gateway.workflow_cli:workflow_app",
        "approval": "services.gateway.workflow_cli:approval_app",
        "policy": "services.gateway.policy_cli:policy_app",
        "agent": "services.gateway.agent_cli:agent_app",
        "promotion": "services.gateway.promotion_cli:promotion_app",
        "audit": "services.gateway.audit_cli:audit_app",
        "export": "services.gateway.export_cli:export_app",
        "evidence": "services.gateway.evidence_cli:evidence_app",
        "debrief": "services.gateway.evidence_cli:debrief_app",
    },
    # The one sender of requests: the services trust the tenant a request names because only
    # the gateway, which has authenticated the caller, can send one.
    bus=BusAccess(
        calls=("admission", "audit", "cost", "incident", "workflow"), work="take", live="watch"
    ),
)
