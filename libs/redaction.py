"""Secrets out of everything printed: logs, state files, error messages.

One implementation for the whole project. :func:`redact_text` replaces, wherever they appear in a
string:

- the password of a URL (``scheme://user:pw@host`` becomes ``scheme://user:***@host``) and a
  ``password=...`` parameter of a URL or a libpq key-value string;
- the value after a secret-bearing name (``Authorization``, ``X-API-Key``, ``X-Admin-Token``,
  ``password``, ``secret``, ``token``, ``credentials`` ...), whether written ``name=value``,
  ``name: value`` or ``"name": "value"``;
- bearer tokens, API keys (``mc_<key_id>_<secret>`` keeps its key id, which names the key and is
  no secret) and JSON web tokens (``eyJ...``);
- the ``input_value=...`` pydantic quotes in a validation error, which would copy the request
  payload (or a part of it) into the log.

:func:`redact_value` applies it to nested structures, and replaces the whole value of a mapping
entry whose key names a secret. The logging setup (:mod:`libs.observability`) runs every log
line, structlog's and the standard library's, through these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# ``password=...`` in a key-value connection string or a URL's query, quoted or not.
_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
# ``scheme://user:password@``: the password runs to the last ``@`` of the token.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'\"]*):[^\s'\"]*@")

# ``api-key`` alone is left out: ``api-key:<key_id>`` is how a key's actions are attributed, and
# a key itself is recognised by its shape.
_SECRET_NAMES = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "apikey",
    "x-admin-token",
    "admin-token",
    "password",
    "passwd",
    "secret",
    "client-secret",
    "token",
    "access-token",
    "refresh-token",
    "id-token",
    "credentials",
    "cookie",
    "set-cookie",
)
_NAME_ALTERNATIVES = "|".join(
    sorted({re.escape(n).replace("\\-", "[-_]") for n in _SECRET_NAMES}, key=len, reverse=True)
)
# ``name: value``, ``name=value``, ``"name": "value"``, ``'name': 'value'`` (a dict's repr).
_NAMED_SECRET = re.compile(
    rf"""(?<![A-Za-z0-9_-])(["']?(?:{_NAME_ALTERNATIVES})["']?\s*[:=]\s*)"""
    r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|(?:(?:Bearer|Basic|Token)\s+)?[^\s,;&}\]'"]+)""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# API keys as services/gateway/domain.py issues them: mc_<12 of [a-z0-9]>_<token_urlsafe>.
_API_KEY = re.compile(r"\b(mc_[a-z0-9]{12}_)[A-Za-z0-9_-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*)?")
_PYDANTIC_INPUT = re.compile(r"input_value=.*(, input_type=)")

_SECRET_KEYS = frozenset(n.replace("-", "_") for n in _SECRET_NAMES) | {
    "api_key",
    "admin_token",
    "database_url",
    "database_admin_url",
    "nats_url",
}
"""Mapping keys whose whole value is hidden; URLs among them keep their shape through
:func:`redact_url` instead."""
_URL_KEYS = frozenset({"database_url", "database_admin_url", "nats_url"})


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print and to write to disk).

    Covers every form a connection string takes: ``scheme://user:pw@host``, ``?password=pw``
    and libpq's ``key=value`` form. Nothing is parsed strictly, so a malformed URL is redacted
    too instead of raising.
    """
    out = _PASSWORD_PARAM.sub(rf"\1{MASK}", url)
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", out)


def redact_text(text: str) -> str:
    """``text`` with every secret in it replaced by ``***`` (see the module's description)."""
    out = redact_url(text)
    out = _NAMED_SECRET.sub(rf"\1{MASK}", out)
    out = _BEARER.sub(rf"\1 {MASK}", out)
    out = _API_KEY.sub(rf"\1{MASK}", out)
    out = _JWT.sub(MASK, out)
    return _PYDANTIC_INPUT.sub(r"input_value=<hidden>\1", out)


def is_secret_key(key: object) -> bool:
    """Whether a mapping entry named ``key`` holds a secret as a whole."""
    return isinstance(key, str) and key.lower().replace("-", "_") in _SECRET_KEYS


def redact_value(value: Any) -> Any:
    """``value`` with every secret hidden: strings through :func:`redact_text`, containers entry
    by entry (a secret-named entry entirely), other objects by their ``repr``."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: redact_entry(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple) and len(value) == 2 and is_secret_key(_text(value[0])):
        # A (name, value) pair, as header lists hold them.
        return [redact_value(value[0]), MASK]
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    return redact_text(repr(value))


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def redact_entry(key: Any, value: Any) -> Any:
    """The value of the mapping entry ``key: value`` as it may be shown."""
    if not is_secret_key(key) or value is None:
        return redact_value(value)
    if isinstance(key, str) and key.lower() in _URL_KEYS and isinstance(value, str):
        return redact_url(value)
    return MASK
