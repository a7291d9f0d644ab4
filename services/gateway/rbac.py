"""Who may do what: roles of users, scopes of API keys, and the permission every route declares.

Pure rules, no I/O. Each ``/v1`` route declares exactly one :class:`Permission` through its
dependency (``services.gateway.entrypoints``); :data:`RULES` says which roles and which key scopes
hold it, and :func:`authorize` is the one check. ``docs/rbac.md`` is generated from these tables
(``python -m services.gateway.rbac``), and a test holds the two together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, get_args

from libs.contracts.events import KeyScope, Role
from libs.errors import Forbidden, InvalidInput

ROLES: tuple[Role, ...] = get_args(Role)
SCOPES: tuple[KeyScope, ...] = get_args(KeyScope)
ALL_SCOPES: frozenset[str] = frozenset(SCOPES)

# A user id names the actor ``user:<id>`` of every event the user causes; the envelope's actor is
# at most 200 characters, so ids stay well below that, in an alphabet safe in logs and subjects.
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@|:+-]{0,127}$"
_USER_ID = re.compile(USER_ID_PATTERN)


class Permission(StrEnum):
    """What a route needs of its caller."""

    PUBLIC = "public"
    SELF = "self"
    READ = "read"
    ADMIT = "admit"
    INGEST = "ingest"
    INCIDENTS = "incidents"
    CONFIGURE = "configure"
    OPERATE = "operate"
    WORKFLOWS = "workflows"
    EXECUTE = "execute"
    WORK = "work"
    APPROVE = "approve"
    GOVERN = "govern"
    REVIEW = "review"
    EXPORT = "export"
    EVIDENCE = "evidence"
    ATTEST = "attest"
    KEYS = "keys"


@dataclass(frozen=True)
class Rule:
    """The roles (of users) and scopes (of API keys) that hold a permission; ``what`` completes
    "may not ..." in a refusal."""

    roles: frozenset[str]
    scopes: frozenset[str]
    what: str


def _rule(roles: Iterable[str], scopes: Iterable[str], what: str) -> Rule:
    return Rule(frozenset(roles), frozenset(scopes), what)


RULES: Mapping[Permission, Rule] = {
    Permission.PUBLIC: _rule(ROLES, SCOPES, "call this route"),
    Permission.SELF: _rule(ROLES, SCOPES, "see who they are"),
    Permission.READ: _rule(
        ROLES,
        {"read"},
        "read the tenant's runs, incidents, policies, costs, analytics and statements, its API "
        "keys (never their secrets) and members",
    ),
    Permission.ADMIT: _rule(
        {"operator", "admin"}, {"admit"}, "ask admission for a step or a policy hook's decision"
    ),
    Permission.INGEST: _rule({"operator", "admin"}, {"ingest"}, "start, record or finish runs"),
    Permission.INCIDENTS: _rule(
        {"operator", "approver", "admin"}, {"ingest"}, "acknowledge or resolve incidents"
    ),
    Permission.CONFIGURE: _rule(
        {"admin"},
        {"ingest"},
        "change the tenant's price table, budgets, policy settings or policy bundles, or "
        "simulate a policy bundle on past decisions",
    ),
    Permission.OPERATE: _rule({"admin"}, {"ingest"}, "rebuild the projections"),
    Permission.WORKFLOWS: _rule(
        {"operator", "admin"},
        {"ingest"},
        "register agents, save, validate, sandbox or fork agent drafts, request or execute "
        "agent promotions, or save workflow definitions",
    ),
    Permission.EXECUTE: _rule({"operator", "admin"}, {"ingest"}, "start or abort executions"),
    # Workers are agents: they hold keys. People do not take work.
    Permission.WORK: _rule((), {"ingest"}, "take dispatched workflow steps"),
    # Approvals are people's: no key may give one.
    Permission.APPROVE: _rule(
        {"approver", "admin"}, (), "approve or reject workflow steps or promotion requests"
    ),
    Permission.GOVERN: _rule(
        {"admin"},
        (),
        "change the tenant's approval rules or policy signing keys, grant or revoke "
        "policy exceptions, or promote or disable agents",
    ),
    Permission.EXPORT: _rule(
        ROLES, {"read"}, "start exports of the tenant's runs and executions (events with hashes)"
    ),
    # Acknowledging a diff says a person viewed it: no key may do it.
    Permission.REVIEW: _rule(ROLES, (), "acknowledge having viewed a diff"),
    # Signed compliance documents: for the people who answer for them, and read-scoped keys
    # (an auditor's export job).
    Permission.EVIDENCE: _rule(
        {"approver", "admin"},
        {"read"},
        "read the tenant's SOC2 evidence, executive debriefs or attestations",
    ),
    # An attestation is a statement someone answers for: people only.
    Permission.ATTEST: _rule({"admin"}, (), "generate a compliance attestation"),
    # A key that could issue keys would outlive its own revocation: people only.
    Permission.KEYS: _rule({"admin"}, (), "issue or revoke the tenant's API keys"),
}


@dataclass(frozen=True)
class KeyPrincipal:
    """An agent, authenticated by an API key of ``tenant_id`` that holds ``scopes``."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str] = ALL_SCOPES

    @property
    def actor(self) -> str:
        """How the caller is named in the records it causes."""
        return f"api-key:{self.key_id}"

    @property
    def human(self) -> bool:
        """Agents' actions keep their own actors (``agent:<id>``) in the events."""
        return False


@dataclass(frozen=True)
class UserPrincipal:
    """A person, authenticated by a bearer token, acting in ``tenant_id`` with ``roles`` there."""

    tenant_id: str
    user_id: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def actor(self) -> str:
        """How the caller is named in the records it causes: every event of theirs says so."""
        return f"user:{self.user_id}"

    @property
    def human(self) -> bool:
        """People are named as the actor of every event their requests cause."""
        return True


Principal = KeyPrincipal | UserPrincipal


def authorize(principal: Principal, permission: Permission) -> None:
    """Let ``principal`` through if it holds ``permission``, else :class:`Forbidden` saying why."""
    rule = RULES[permission]
    if isinstance(principal, KeyPrincipal):
        if principal.scopes & rule.scopes:
            return
        needed = " or ".join(f"'{s}'" for s in sorted(rule.scopes))
        if not rule.scopes:
            raise Forbidden(f"API keys may not {rule.what}; sign in as a user")
        raise Forbidden(
            f"this API key lacks the scope {needed} needed to {rule.what} (its scopes: "
            f"{', '.join(sorted(principal.scopes))})"
        )
    if principal.roles & rule.roles:
        return
    held = ", ".join(sorted(principal.roles)) or "none"
    raise Forbidden(
        f"user {principal.user_id!r} may not {rule.what} in tenant {principal.tenant_id!r}: that "
        f"needs the role {' or '.join(r for r in ROLES if r in rule.roles)} (held: {held})"
    )


def choose_tenant(user_id: str, grants: Mapping[str, frozenset[str]], asked: str | None) -> str:
    """The tenant a user's request acts in: the one named in ``X-Tenant-Id``, else their only one.

    Naming a tenant the user holds no role in is :class:`Forbidden`, so a user of tenant A cannot
    act in tenant B whatever they send.
    """
    held = sorted(t for t, roles in grants.items() if roles)
    if asked:
        if asked not in held:
            raise Forbidden(f"user {user_id!r} holds no role in tenant {asked!r}")
        return asked
    if len(held) == 1:
        return held[0]
    if not held:
        raise Forbidden(f"user {user_id!r} holds no role in any tenant")
    raise InvalidInput(
        f"user {user_id!r} holds roles in several tenants ({', '.join(held)}): name one in the "
        "X-Tenant-Id header"
    )


def check_user_id(user_id: str) -> str:
    """``user_id`` if it can name a user, else :class:`InvalidInput`."""
    if not _USER_ID.fullmatch(user_id):
        raise InvalidInput(
            "a user id is 1-128 characters of letters, digits and ._@|:+-, starting with a "
            "letter or digit"
        )
    return user_id


def check_role(role: str) -> Role:
    """``role`` if it is one of :data:`ROLES`, else :class:`InvalidInput` listing them."""
    for known in ROLES:
        if role == known:
            return known
    raise InvalidInput(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def check_scopes(scopes: Iterable[str]) -> list[KeyScope]:
    """The distinct scopes asked for, in :data:`SCOPES` order (all of them when none is named)."""
    asked = set(scopes)
    unknown = asked - ALL_SCOPES
    if unknown:
        raise InvalidInput(
            f"unknown scope {', '.join(sorted(unknown))}: scopes are {', '.join(SCOPES)}"
        )
    return [s for s in SCOPES if s in asked] or list(SCOPES)


def grants_from_claim(value: Any) -> dict[str, frozenset[str]]:
    """Roles per tenant from an identity provider's roles claim (see ``docs/rbac.md``).

    Two shapes are read: an object ``{"<tenant>": ["<role>", ...]}`` (or one role as a string),
    and a list of ``"<tenant>:<role>"`` strings (a groups claim). Entries that are not roles of
    Mission Control are ignored, since a groups claim carries the provider's other groups too.
    """
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        for tenant, roles in value.items():
            for role in roles if isinstance(roles, list) else [roles]:
                pairs.append((tenant, role))
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, str) and ":" in v:
                tenant, role = v.rsplit(":", 1)
                pairs.append((tenant, role))
    grants: dict[str, set[str]] = {}
    for tenant, role in pairs:
        if isinstance(tenant, str) and role in ROLES:
            grants.setdefault(tenant, set()).add(role)
    return {t: frozenset(r) for t, r in grants.items()}


# --- the documented table -------------------------------------------------------------------------


def route_table(routes: Iterable[tuple[str, str, Permission]]) -> str:
    """Markdown: each route, its permission, and ✓ under each role and scope that holds it."""
    header = ["route", "permission", *ROLES, *(f"key: {s}" for s in SCOPES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, path, permission in routes:
        rule = RULES[permission]
        marks = [("✓" if r in rule.roles else "") for r in ROLES]
        marks += [("✓" if s in rule.scopes else "") for s in SCOPES]
        lines.append(f"| `{method} {path}` | {permission.value} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"
