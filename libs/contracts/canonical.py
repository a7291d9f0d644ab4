"""RFC 8785 (JSON Canonicalization Scheme) bytes of a JSON value, fast where it can be.

The event store's hash chain is computed over RFC 8785 bytes so that anyone can re-verify it with
any JCS implementation. The reference implementation (``rfc8785``) is pure Python and costs
about 0.1 ms per event, half of an append's CPU. For the values events actually carry (integers
within IEEE-754's exact range, floats of everyday magnitude, keys without characters beyond the
Basic Multilingual Plane) orjson's sorted, compact output is byte-for-byte the RFC 8785 form once
integral floats are written as integers, so those take the fast path; everything else goes
through ``rfc8785``. ``tests/unit/test_canonical.py`` checks the two
agree on generated values.
"""

from __future__ import annotations

from typing import Any

import orjson
import rfc8785

_MAX_EXACT_INT = 2**53 - 1


class _NeedsReference(Exception):
    """The value has something only the reference implementation formats right."""


def _prepare(v: Any) -> Any:
    """``v`` with integral floats as ints; raises when the fast path could differ from RFC 8785.

    RFC 8785 writes numbers as ECMAScript does: 1.0 is ``1`` and -0.0 is ``0`` (orjson would write
    ``1.0`` and ``-0.0``), so integral floats become ints. Other floats keep orjson's shortest
    round-trip digits only where both use plain decimal notation; very small or very large
    magnitudes take the reference path.
    """
    if isinstance(v, str) or v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        if -_MAX_EXACT_INT <= v <= _MAX_EXACT_INT:
            return v
        raise _NeedsReference
    if isinstance(v, float):
        if v.is_integer() and -_MAX_EXACT_INT <= v <= _MAX_EXACT_INT:
            return int(v)
        if 1e-4 <= abs(v) < 1e15:
            return v
        raise _NeedsReference
    if isinstance(v, dict):
        out = {}
        for k, item in v.items():
            # Astral characters sort differently by UTF-16 code unit (RFC 8785) than by code
            # point (orjson); keys are almost always ASCII, so just let the reference decide.
            if not isinstance(k, str) or (not k.isascii() and any(ord(c) > 0xFFFF for c in k)):
                raise _NeedsReference
            out[k] = _prepare(item)
        return out
    if isinstance(v, list | tuple):
        return [_prepare(item) for item in v]
    raise _NeedsReference  # Decimals and anything else: the reference formats them


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 serialisation of ``value``."""
    try:
        return orjson.dumps(_prepare(value), option=orjson.OPT_SORT_KEYS)
    except (_NeedsReference, orjson.JSONEncodeError):
        # orjson refuses e.g. a lone surrogate: the reference has its own answer for it.
        return bytes(rfc8785.dumps(value))
