"""How the runtime finds the workflow-engine service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="workflow-engine",
    module="services.workflow_engine",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_workflow_engine",
    stream_categories=(
        "run",
        "workflow_definitions",
        "agents",
        "execution",
        "approval_policy",
        "budget",
        "promotion",
    ),
    bus=BusAccess(
        serves="workflow",
        consumers=(
            "workflow-violations",
            "workflow-executions",
            "workflow-dispatch",
            "workflow-budget-costs",
        ),
        work="dispatch",
        live="publish",
    ),
)
