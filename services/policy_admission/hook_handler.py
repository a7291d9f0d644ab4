"""Policy hooks' I/O: ``mc.rpc.admission.evaluate_hook``.

The bundle, settings and policy exceptions are the ones admission decides with (in memory, per
tenant and environment). ``after_execute`` reads the run as admission folds it and the step as
recorded in the run's stream; every hook but ``before_execute`` records its decision as
``policy.hook_evaluated`` in a stream of its own, ``<t>/policy/hook-<decision_id>``, before it
answers. ``before_execute`` only evaluates (a dry run of admission): the admission itself is
``admit``, which records ``admission.decided``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from libs.contracts import new_uuid7, stream_id_for
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import StepRecorded
from libs.contracts.registry import decode
from libs.domain.prices import PRICE_TABLE_ID
from libs.domain.run import RUN_CATEGORY
from libs.errors import NotFound
from libs.eventbus.repository import Aggregate, EventMeta, Recorded, Repository
from services.policy_admission.handlers import AdmissionHandler, _context_fold
from services.policy_admission.hooks import (
    ADMISSION_HOOK,
    SCAN_HOOK,
    Evaluated,
    HookContext,
    HookDecision,
    after_execute_context,
    evaluate_hook,
    hook_events,
    iter_scan,
    parse_after_execute,
    recorded_step,
    subject_of,
    waive_hook,
    worst,
)


def _unchanged(state: None, recorded: Sequence[Recorded]) -> None:
    return state


HOOK_DECISIONS = Aggregate[None](category="policy", initial=lambda t, i: None, fold=_unchanged)
"""``<t>/policy/hook-<decision_id>``: one hook decision's events (nothing is folded)."""


class HookHandler:
    """Answers ``evaluate_hook`` with admission's bundles, settings and exceptions."""

    def __init__(self, admission: AdmissionHandler) -> None:
        self.admission = admission
        self._records: Repository[None] | None = None

    async def evaluate(
        self, tenant: str, context: HookContext, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        """``{decision_id, hook, outcome, ...decision, runbooks}``; for ``on_policy_update``
        the worst outcome and ``subjects``: each agent's id and decision."""
        a = self.admission
        bundle = a.bundle_for(tenant, context.environment)
        settings = a.settings_for(tenant)
        decision_id = str(new_uuid7())
        if context.hook == SCAN_HOOK:
            scanned: list[Evaluated] = []
            for subject, decision in iter_scan(
                bundle, context, tenant_id=tenant, settings=settings
            ):
                scanned.append(Evaluated(subject, decision))
                # A decision takes milliseconds and a scan up to 500 of them: let the
                # admissions waiting on this loop through between subjects. The hooks have an
                # interpreter of their own, and each evaluation is whole between two awaits.
                await asyncio.sleep(0)
            await self._record(tenant, context, decision_id, scanned, headers)
            return {
                "decision_id": decision_id,
                "hook": context.hook,
                "outcome": worst(e.decision.outcome for e in scanned),
                "bundle_digest": bundle.digest,
                "subjects": [{"subject": e.subject, **e.decision.as_answer()} for e in scanned],
            }
        if context.hook == "after_execute":
            decision = await self._after_execute(tenant, context, bundle, settings)
        else:
            decision = evaluate_hook(bundle, context, tenant_id=tenant, settings=settings)
        if context.hook != ADMISSION_HOOK:
            await self._record(
                tenant,
                context,
                decision_id,
                [Evaluated(subject_of(context), decision)],
                headers,
            )
        return {"decision_id": decision_id, **decision.as_answer()}

    async def _after_execute(
        self,
        tenant: str,
        context: HookContext,
        bundle: Any,
        settings: dict[str, Any] | None,
    ) -> HookDecision:
        """Judge the recorded step with the run as admission folds it, then apply the policy
        exceptions by this decision's clock (never at or after their expiry)."""
        a = self.admission
        req = parse_after_execute(context)
        table = (await a.prices.load(tenant, PRICE_TABLE_ID)).table
        run = await a.runs.load(tenant, req.run_id, fold=_context_fold(table))
        if not run.run.version:
            raise NotFound(f"run {req.run_id!r} not found")
        steps = [
            e
            for e in (
                decode(env)
                for env in await a.store.read_stream(
                    stream_id_for(tenant, RUN_CATEGORY, req.run_id)
                )
            )
            if isinstance(e, StepRecorded)
        ]
        step = recorded_step(steps, req.step_index)
        if step is None:
            raise NotFound(f"step {req.step_index} of run {req.run_id!r} is not recorded")
        judged = after_execute_context(context, run, step)
        decision = evaluate_hook(bundle, judged, tenant_id=tenant, settings=settings)
        if a.tenants is None:
            return decision
        return waive_hook(
            decision,
            a.tenants.exceptions_for(tenant),
            agent_id=run.agent_id,
            run_id=run.run_id,
            at=a.clock(),
        )

    async def _record(
        self,
        tenant: str,
        context: HookContext,
        decision_id: str,
        evaluated: Sequence[Evaluated],
        headers: Mapping[str, str],
    ) -> None:
        events: list[DomainEvent] = list(
            hook_events(evaluated, decision_id=decision_id, environment=context.environment)
        )
        meta = EventMeta(
            correlation_id=headers.get("Mc-Correlation-Id") or decision_id,
            actor=context.actor.id,
        )
        if self._records is None:
            self._records = Repository(self.admission.store, HOOK_DECISIONS, cache_size=1)
        await self._records.execute(tenant, f"hook-{decision_id}", lambda _: events, meta)
