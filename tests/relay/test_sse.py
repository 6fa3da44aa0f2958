"""SSE framing edge cases (``rapidphoto_relay.sse``), checked against the test client's parser."""

from __future__ import annotations

import pytest

from rapidphoto_relay import sse
from tests.support.sse import parse_frame


def test_event_frame_has_id_event_and_data_in_order() -> None:
    frame = sse.event('{"type":"X"}', event_type="X", event_id="1-0")
    assert frame == b'id: 1-0\nevent: X\ndata: {"type":"X"}\n\n'


def test_event_without_id_or_type_is_data_only() -> None:
    assert sse.event("hello") == b"data: hello\n\n"


@pytest.mark.parametrize("junk", ["\n", "\r", "\r\n", "\x00"])
def test_cr_lf_and_nul_are_stripped_from_id_and_event(junk: str) -> None:
    frame = sse.event("d", event_type=f"A{junk}data: injected", event_id=f"1-0{junk}retry: 1")
    parsed = parse_frame(frame)
    assert parsed.event == "Adata: injected"
    assert parsed.id == "1-0retry: 1"
    assert parsed.data == "d"
    assert parsed.retry is None
    assert frame.count(b"\n\n") == 1


def test_multi_line_data_becomes_several_data_lines() -> None:
    frame = sse.event("a\nb\r\nc\rd", event_type="X")
    assert frame == b"event: X\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert parse_frame(frame).data == "a\nb\nc\nd"


def test_empty_data_is_one_empty_data_line() -> None:
    assert sse.event("") == b"data: \n\n"


def test_bytes_and_str_give_the_same_frame() -> None:
    assert sse.event(b"\xc3\xa9", event_type=b"T") == sse.event("é", event_type="T")


def test_comment_is_a_heartbeat_frame_clients_ignore() -> None:
    assert sse.comment("heartbeat") == b": heartbeat\n\n"
    assert sse.comment() == b":\n\n"
    assert sse.comment("a\nb") == b": a\n: b\n\n"
    parsed = parse_frame(sse.HEARTBEAT)
    assert parsed.comments == ["heartbeat"]
    assert not parsed.is_event


def test_retry_frame() -> None:
    assert sse.retry(2000) == b"retry: 2000\n\n"
    assert parse_frame(sse.retry(0)).retry == 0
    with pytest.raises(ValueError, match="non-negative"):
        sse.retry(-1)
