"""How the runtime finds the workflow-engine service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="workflow-engine",
    module="services.workflow_engine",
    migrations=Path(__file__).parent / "migrations",
    bus=BusAccess(
        serves="workflow",
        consumers=("workflow-violations", "workflow-executions", "workflow-dispatch"),
        work="dispatch",
    ),
)
