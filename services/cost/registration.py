"""How the runtime finds the cost service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="cost",
    module="services.cost",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_cost",
    stream_categories=("cost", "prices"),
    bus=BusAccess(serves="cost", consumers=("cost-steps",)),
)
