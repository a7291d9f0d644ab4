"""The relay's publish windows never hold two events of one stream."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.eventbus.relay import windows

pytestmark = pytest.mark.unit


@given(st.lists(st.sampled_from("abcde"), max_size=60), st.integers(min_value=1, max_value=8))
def test_windows_keep_order_cap_size_and_never_repeat_a_stream(streams: list[str], limit: int):
    rows: list[dict[str, Any]] = [{"stream_id": s, "position": i} for i, s in enumerate(streams)]
    out = windows(rows, limit)
    assert [r for w in out for r in w] == rows
    for w in out:
        assert 1 <= len(w) <= limit
        ids = [r["stream_id"] for r in w]
        assert len(ids) == len(set(ids))


def test_a_burst_of_one_stream_is_published_one_at_a_time() -> None:
    rows = [{"stream_id": "s", "position": i} for i in range(3)]
    assert windows(rows, 100) == [[rows[0]], [rows[1]], [rows[2]]]
