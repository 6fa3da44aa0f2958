"""The load tests' raw SSE client (loadtests/sse_client.py): framing and the loopback-only rule."""

from __future__ import annotations

import pytest
from loadtests.sse_client import NotLoopback, _FrameParser, loopback_origin


def test_frames_split_across_chunks_are_joined() -> None:
    parser = _FrameParser()
    assert parser.feed(b"retry: 2000\n\nid: 1-0\nevent: PHOTO_UP", 1.0)[0].retry == 2000
    frames = parser.feed(b'LOADED\ndata: {"a":1}\n\n: heartbeat\n\n', 2.0)
    assert [f.event for f in frames] == ["PHOTO_UPLOADED", None]
    event, beat = frames
    assert (event.id, event.json(), event.received_at) == ("1-0", {"a": 1}, 2.0)
    assert beat.is_heartbeat
    assert beat.comments == ["heartbeat"]


def test_multi_line_data_and_crlf() -> None:
    frames = _FrameParser().feed(b"data: a\r\ndata: b\r\n\r\n", 0.0)
    assert frames[0].data == "a\nb"
    assert not frames[0].is_heartbeat


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8080", "https://127.0.0.1:8080", "http://example.com", "ftp://::1"]
)
def test_only_loopback_http_is_a_target(url: str) -> None:
    with pytest.raises(NotLoopback):
        loopback_origin(url)


def test_loopback_origin() -> None:
    assert loopback_origin("http://127.0.0.1:8081/") == ("127.0.0.1", 8081)
    assert loopback_origin("http://localhost") == ("localhost", 80)
