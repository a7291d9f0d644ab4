"""How the runtime finds the audit-replay service (entry point ``mission_control.services``)."""

from pathlib import Path

from libs.runtime.registry import BusAccess, ServiceRegistration

REGISTRATION = ServiceRegistration(
    name="audit-replay",
    module="services.audit_replay",
    migrations=Path(__file__).parent / "migrations",
    db_role="mc_audit_replay",
    # The compliance attestations it generates (services/audit_replay/evidence_queries.py).
    stream_categories=("attestation",),
    bus=BusAccess(
        serves="audit", consumers=("audit-control", "audit-bulk"), removes=("audit-projector",)
    ),
    single_replica=(
        "its projector keeps run and incident states in the process and folds new events onto "
        "them, so two replicas sharing its consumers would each fold onto states the other has "
        "moved past; embedded chDB also lives inside one process"
    ),
)
