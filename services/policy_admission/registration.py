"""How the runtime finds the policy-admission service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="policy-admission",
    module="services.policy_admission",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_policy_admission",
    stream_categories=("decisions", "policy"),
    bus=BusAccess(
        serves="admission",
        consumers=("admission-steps", "admission-incidents"),
        # A policy simulation reads the recorded decisions and step costs it replays.
        reads=("audit.simulation_decisions", "audit.step_costs"),
    ),
)
