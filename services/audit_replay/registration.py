"""How the runtime finds the audit-replay service (entry point ``mission_control.services``)."""

from libs.runtime.registry import ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="audit-replay",
    module="services.audit_replay",
    # Embedded chDB lives inside one process: a second replica needs a ClickHouse server.
    scale_out_requires=("clickhouse_url",),
)
