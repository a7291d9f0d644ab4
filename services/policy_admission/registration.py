"""How the runtime finds the policy-admission service (entry point ``mission_control.services``)."""

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="policy-admission",
    module="services.policy_admission",
    bus=BusAccess(serves="admission"),
)
