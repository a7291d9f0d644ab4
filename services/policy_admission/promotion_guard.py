"""What every move of an agent into an environment must pass, whichever way it is asked for (a
promotion request carried out, or an admin's direct ``sandbox`` / ``promote``): no open incident
freezes the environment, and sandbox and production have not drifted apart unacknowledged."""

from __future__ import annotations

from libs.contracts.policy import Environment
from libs.errors import Conflict
from services.policy_admission.drift_handlers import DriftWatch
from services.policy_admission.freeze_handlers import Freezes


async def ensure_promotable(
    freezes: Freezes | None, drift: DriftWatch | None, tenant_id: str, environment: Environment
) -> None:
    """Raise 409 ``promotion_frozen`` (naming the incidents) or ``promotion_drifted`` (naming
    the dimensions) when a move into ``environment`` may not go ahead now."""
    blockers = await freezes.blockers(tenant_id, environment) if freezes is not None else []
    if blockers:
        incidents = "; ".join(b.removeprefix("promotion_frozen: ") for b in blockers)
        raise Conflict(f"promotion_frozen: promotions into {environment} are frozen: {incidents}")
    drifted = await drift.blockers(tenant_id) if drift is not None else []
    if drifted:
        why = "; ".join(b.removeprefix("policy_drift: ") for b in drifted)
        raise Conflict(f"promotion_drifted: {why}")
