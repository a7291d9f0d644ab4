"""Schemathesis hooks for ``test_api_fuzz`` (loaded through ``SCHEMATHESIS_HOOKS``).

In the stateful phase a run is started without a ``run_id``, so the gateway picks a fresh one:
generated ids repeat (``"0"`` again and again), and a chain that begins with a 409 for a run that
exists already never reaches admission and steps. The other phases still send every ``run_id``
they generate. The stateful phase also leaves out ``X-Tenant-Id``: it chooses the tenant of a
person with roles in several, and a generated value for an API key is a 403 that ends the chain
(the other phases still send it).
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
    if stateful and case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "x-tenant-id"}
    return case
