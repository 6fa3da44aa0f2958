"""Shared pieces of the property-based tests (hypothesis): settings and strategies used by several."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

#: Bounded: the whole set of properties runs in seconds; ``deadline=None`` as CI machines are busy.
PROPERTY = settings(max_examples=400, deadline=None)

#: Any JSON value (what a payload, a job argument or a token claim may hold), a few levels deep.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
