"""The keyset pages of policy-admission's listings (simulations, diffs): a cursor resumes after
the row it names, to the microsecond, and one the listing did not make is a 422 naming it."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest

from libs.errors import InvalidInput
from services.policy_admission.listing import Page, decode_cursor, encode_cursor, page_of

pytestmark = pytest.mark.unit

ID = r"^[0-9a-f-]{36}$"
AT = datetime(2026, 11, 3, 12, 0, 0, 123456, tzinfo=UTC)
KEY = "01938f5e-0000-7000-8000-000000000001"


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_a_cursor_names_its_row_to_the_microsecond_and_in_its_zone() -> None:
    assert decode_cursor(encode_cursor(AT, KEY), "simulations", ID) == (AT, KEY)
    later = AT.astimezone(timezone(timedelta(hours=5)))
    assert decode_cursor(encode_cursor(later, KEY), "simulations", ID) == (AT, KEY)
    assert "=" not in encode_cursor(AT, KEY)


@pytest.mark.parametrize(
    "cursor",
    [
        "bm90LWEtY3Vyc29y",  # "not-a-cursor"
        "%%%",
        _raw("2026-11-03T12:00:00|" + KEY),  # no zone
        _raw("2026-11-03T12:00:00+00:00|sha256:" + "0" * 64),  # another listing's id
        _raw("yesterday|" + KEY),
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
    ],
)
def test_a_cursor_the_listing_did_not_make_is_refused_by_name(cursor: str) -> None:
    with pytest.raises(InvalidInput, match=r"^cursor is not one a listing of simulations returned"):
        decode_cursor(cursor, "simulations", ID)


def test_a_page_read_with_one_more_row_knows_whether_another_follows() -> None:
    rows = [{"at": AT - timedelta(seconds=i), "id": f"{i:036d}"} for i in range(3)]
    shown, cursor = page_of(rows, Page(limit=2), "at", "id")
    assert shown == rows[:2]
    assert cursor is not None and decode_cursor(cursor, "x", ID) == (rows[1]["at"], rows[1]["id"])
    shown, cursor = page_of(rows[:2], Page(limit=2), "at", "id")
    assert shown == rows[:2] and cursor is None
    assert page_of([], Page(limit=2), "at", "id") == ([], None)
