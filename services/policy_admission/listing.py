"""Keyset pages of a tenant's records, newest first: the simulations (``list_simulations``) and
the diffs (``list_diffs``).

A page is ordered by a timestamp and then an id, both descending, so rows with the same time
keep one order. Its cursor is the last row's (time, id), base64url-encoded: opaque to callers,
and a cursor this code did not make is a 422 naming it, not a 500.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libs.errors import InvalidInput

MAX_CURSOR = 300
"""Far above an encoded cursor (a timestamp and an id of at most 100 characters)."""
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class Page:
    """Where a page starts (after the row ``after`` names, or at the newest) and its size."""

    after: tuple[datetime, str] | None = None
    limit: int = DEFAULT_LIMIT


def encode_cursor(at: datetime, key: str) -> str:
    """An opaque cursor that resumes a listing after the row at ``at`` with id ``key``."""
    raw = f"{at.isoformat()}|{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, what: str, key_pattern: str) -> tuple[datetime, str]:
    """The row a cursor resumes after; :class:`InvalidInput` (422) for a cursor this code did not
    make (``what`` names the listing, ``key_pattern`` its ids)."""
    bad = InvalidInput(f"cursor is not one a listing of {what} returned (pass next_cursor as is)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, key = raw.split("|", 1)
        when = datetime.fromisoformat(at)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise bad from None
    if when.tzinfo is None or not re.fullmatch(key_pattern, key):
        raise bad
    return when, key


def page_of(
    rows: Sequence[dict[str, Any]], page: Page, at: str, key: str
) -> tuple[Sequence[dict[str, Any]], str | None]:
    """The rows of the page (``rows`` were read with one more than its limit, to learn whether
    another follows) and the next page's cursor (None on the last)."""
    shown = rows[: page.limit]
    more = len(rows) > page.limit
    return shown, encode_cursor(shown[-1][at], shown[-1][key]) if more else None
