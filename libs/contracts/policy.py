"""Shapes shared by the gateway and policy-admission for tenant policy bundles and settings.

A tenant's **settings** are the limits and allowlists the repository's bundle reads per tenant
(``lib/config.rego``: ``setting(name, fallback)``). Set through ``PUT /v1/policy-settings``,
they reach every bundle as ``input.settings`` and win over ``data.json``; a field left out falls
back to the bundle's data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.canonical import canonical_json
from libs.contracts.limits import MAX_NAME, MAX_TOKENS

Environment = Literal["sandbox", "production"]
ENVIRONMENTS: tuple[Environment, ...] = ("sandbox", "production")
DEFAULT_ENVIRONMENT: Environment = "production"

PolicyHook = Literal[
    "on_create_attempt",
    "on_review_open",
    "on_promotion_attempt",
    "before_execute",
    "after_execute",
    "on_policy_update",
]
"""The lifecycle points at which the policy bundle decides (docs/policies.md, "Hooks")."""

MAX_ALLOWLIST = 500
MAX_COST_USD = Decimal(1_000_000_000)
MAX_SETTINGS_VERSION = 1_000_000_000
SIGNING_KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""No colon: ``/v1/policy-signing-keys/{key_id}:retire`` must not read as a key id."""
BUNDLE_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
MAX_PUBLIC_KEY_PEM = 1000


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


UnicodeText = AfterValidator(_unicode)
"""Refuses a lone surrogate (no encoder along the way takes one): a 422, not a 500."""

AllowedName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME, pattern=r"^[^\x00-\x1f\x7f]+$"),
    UnicodeText,
]


MAX_STEPS_SETTING = 1_000_000
MAX_RETENTION_DAYS = 36_500


class PolicySettings(BaseModel):
    """A tenant's limits and allowlists; a field left out (null) falls back to the bundle.

    An empty allowlist allows everything (the check is off for the tenant), as in ``data.json``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens_per_run: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    max_cost_usd_per_run: Decimal | None = Field(
        default=None, ge=0, le=MAX_COST_USD, decimal_places=6
    )
    model_allowlist: list[AllowedName] | None = Field(default=None, max_length=MAX_ALLOWLIST)
    tool_allowlist: list[AllowedName] | None = Field(default=None, max_length=MAX_ALLOWLIST)
    admission_required: Literal["enforce", "warn"] | None = None
    freeze_min_severity: Literal["low", "medium", "high", "critical"] | None = Field(
        default=None,
        description="An open incident at or above this severity freezes promotions into its "
        "environment until it is resolved (default: high).",
    )
    max_steps_per_run: int | None = Field(default=None, ge=0, le=MAX_STEPS_SETTING)
    """0 turns the max_steps check off."""
    max_memory_retention_days: int | None = Field(default=None, ge=0, le=MAX_RETENTION_DAYS)

    def as_input(self) -> dict[str, Any]:
        """The ``input.settings`` document: the fields set, in JSON types."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            out[name] = float(value) if isinstance(value, Decimal) else value
        return out


def policy_set_hash(
    bundle_digest: str, settings: dict[str, Any] | None, exception_ids: Iterable[str]
) -> str:
    """``sha256:<hex>`` naming everything a decision in one tenant and environment is made with:
    the bundle's digest, the tenant's settings (``input.settings``) and the ids of its open
    policy exceptions. Two decisions with the same hash were made by the same policy set.

    It is the sha256 of the RFC 8785 bytes of ``{"bundle_digest", "settings", "exceptions"}``
    (exception ids sorted; no settings is ``{}``), so anyone can recompute it.
    """
    document = {
        "bundle_digest": bundle_digest,
        "settings": settings or {},
        "exceptions": sorted(set(exception_ids)),
    }
    return "sha256:" + hashlib.sha256(canonical_json(document)).hexdigest()


CANARY_OUTCOMES = ("promoted", "rolled_back")


class CanaryPlan(BaseModel):
    """How a reloaded bundle is tried before it decides for everyone (``docs/policies.md``,
    "Canary and rollback").

    The candidate decides for ``percent`` % of runs (chosen by a stable hash of the run id)
    while the previous bundle decides for the rest. Once the canary has made ``min_decisions``
    decisions and ``min_seconds`` have passed it is judged: promoted when its evaluation error
    rate is at most ``max_error_rate``, its deny rate at most ``max_deny_rate_delta`` above the
    stable bundle's and its p95 evaluation latency at most ``max_p95_delta_ms`` above the stable
    one's; rolled back otherwise. Errors past the budget roll it back at once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: int = Field(default=10, ge=1, le=100)
    min_decisions: int = Field(default=100, ge=1, le=1_000_000)
    min_seconds: int = Field(default=60, ge=0, le=7 * 86_400)
    max_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    max_deny_rate_delta: float = Field(default=0.05, ge=0.0, le=1.0)
    max_p95_delta_ms: float = Field(default=5.0, ge=0.0, le=60_000.0)
