"""Schemathesis hooks for ``test_api_fuzz`` (loaded through ``SCHEMATHESIS_HOOKS``).

In the stateful phase a run is started without a ``run_id``, so the gateway picks a fresh one:
generated ids repeat (``"0"`` again and again), and a chain that begins with a 409 for a run that
exists already never reaches admission and steps. The other phases still send every ``run_id``
they generate.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = getattr(case, "meta", None)
    stateful = meta is not None and meta.phase.name == "stateful"
    if (
        stateful
        and case.operation.label == "POST /v1/runs"
        and isinstance(case.body, dict)
        and "run_id" in case.body
    ):
        case.body = {k: v for k, v in case.body.items() if k != "run_id"}
    return case
