"""The fast canonical JSON is exactly RFC 8785, on generated values."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.contracts.canonical import canonical_json

pytestmark = pytest.mark.unit

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=1500, deadline=None)
@given(_json)
def test_matches_the_reference_implementation(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": [True, None, "\u0000\u001f\u007f\u2028é😀"]},
        {"\U0001f600": 1, "\ue000": 2},  # UTF-16 order differs from code-point order here
        {"x": 1.0, "y": 1e21, "z": -0.0, "w": 12.5, "v": 0.1, "u": 1e-5, "t": 123456.789e9},
        {"big": 2**53 - 1},
    ],
)
def test_tricky_values(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_is_written_as_ecmascript_does(value: float) -> None:
    assert canonical_json([value]) == rfc8785.dumps([value])
