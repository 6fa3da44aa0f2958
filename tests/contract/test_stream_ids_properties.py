"""Properties of stream entry ids and ``Last-Event-ID`` parsing (PROTOCOL §4, §5; issue 9)."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rapidphoto_contract.stream_ids import format_stream_id, parse_stream_id, successor

PROPERTY = settings(max_examples=500, deadline=None)
MAX = 2**64 - 1
parts = st.integers(0, MAX)
ids = st.tuples(parts, parts)
#: Text that looks like an id more often than st.text() alone would.
id_like = st.one_of(
    st.text(),
    st.from_regex(r"\s*[0-9]{1,22}-[0-9]{1,22}\s*", fullmatch=True),
    st.tuples(st.integers(0, 2**70), st.integers(0, 2**70)).map(lambda p: f"{p[0]}-{p[1]}"),
    st.sampled_from(
        ["1-0", "01-00", "1-", "-1", "1-0-0", "1_0", "\u0661-\u0660", "1-0\n", "1.5-0", "+1-0"]
    ),
)


def _expected(text: str) -> tuple[int, int] | None:
    """The rule, restated: both parts plain ASCII decimal (1-20 digits), each at most 2**64-1,
    surrounding whitespace ignored."""
    match = re.fullmatch(r"([0-9]{1,20})-([0-9]{1,20})", text.strip(), flags=re.ASCII)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    return (ms, seq) if ms <= MAX and seq <= MAX else None


@PROPERTY
@given(sid=ids)
@example(sid=(MAX, MAX))
@example(sid=(0, 0))
def test_format_then_parse_is_the_identity(sid: tuple[int, int]) -> None:
    """Rule: every id Redis can make survives formatting and parsing (as text and as bytes)."""
    text = format_stream_id(sid)
    assert parse_stream_id(text) == sid
    assert parse_stream_id(text.encode()) == sid


@PROPERTY
@given(a=ids, b=ids)
def test_ids_order_as_redis_orders_them(a: tuple[int, int], b: tuple[int, int]) -> None:
    """Rule: ids compare as (ms, seq) integer pairs, whatever their text (``9-0`` < ``10-0``)."""
    pa, pb = parse_stream_id(format_stream_id(a)), parse_stream_id(format_stream_id(b))
    assert pa is not None
    assert pb is not None
    assert (pa < pb) == (a[0] < b[0] or (a[0] == b[0] and a[1] < b[1]))


@PROPERTY
@given(sid=ids.filter(lambda s: s != (MAX, MAX)))
def test_successor_is_the_next_id(sid: tuple[int, int]) -> None:
    """Rule: ``successor`` is greater than its id and no id lies strictly between them."""
    nxt = successor(sid)
    assert nxt > sid
    if sid[1] < MAX:
        assert nxt == (sid[0], sid[1] + 1)
    else:
        assert nxt == (sid[0] + 1, 0)


@PROPERTY
@given(value=id_like)
@example(value="18446744073709551616-0")  # 2**64: past Redis's range
@example(value="\u0661-\u0660")  # Arabic-Indic digits: str.isdigit() says yes, Redis says no
def test_any_text_is_an_id_or_none(value: str) -> None:
    """Rule (PROTOCOL §5): a ``Last-Event-ID`` (header or ``lastEventId``) is a complete entry id or
    malformed (``None``, a snapshot); any text at all gives one of the two, never an error."""
    assert parse_stream_id(value) == _expected(value)


@PROPERTY
@given(raw=st.binary(max_size=64) | id_like.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_an_id_or_none(raw: bytes) -> None:
    """Rule: bytes (as Redis returns ids) parse like their ASCII text; non-ASCII bytes are malformed."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        assert parse_stream_id(raw) is None
    else:
        assert parse_stream_id(raw) == _expected(text)
