"""How the runtime finds the incident service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="incident",
    module="services.incident",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_incident",
    stream_categories=("incident",),
    bus=BusAccess(serves="incident", consumers=("incident-violations", "incident-budgets")),
)
