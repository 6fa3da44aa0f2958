"""The capacity benchmark's storm pieces (loadtests/bench/storm.py, capacity.py): requests, the
storm stream's framing, the server loop-lag quantiles. The storms themselves are not run here."""

from __future__ import annotations

from loadtests.bench.storm import STORMS, StormStream, storm_requests
from loadtests.capacity import SCENARIOS, lag_quantiles

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


def test_resume_requests_carry_their_last_event_id() -> None:
    plain, resume = (
        storm_requests("notifications", 8000, 1, None),
        storm_requests("resume", 8000, 2, ["5-0", "6-1"]),
    )
    assert plain[0].startswith(b"GET /api/upload/sessions/notifications/stream HTTP/1.1\r\n")
    assert b"Last-Event-ID" not in plain[0]
    assert resume[1].startswith(b"GET /api/upload/sessions/storm-s1/stream HTTP/1.1\r\n")
    assert b"\r\nLast-Event-ID: 6-1\r\n\r\n" in resume[1]
    assert b"Authorization: Bearer " in resume[1]


async def test_a_storm_stream_is_served_once_it_has_its_frames() -> None:
    stream = StormStream(b"", owed=2)
    stream.data_received(HEAD[:20])
    assert not stream.opened.done()
    stream.data_received(HEAD[20:] + b"e\r\nretry: 2000\n\n\r\n")
    assert stream.opened.result() == 200
    stream.data_received(b"14\r\nid: 1-1\nevent: A\ndata: {}\n\n\r\n")
    assert not stream.served.done()
    stream.data_received(b"14\r\nid: 1-2\nevent: A\ndata: {}\n\n\r\n")
    assert stream.served.done()
    assert stream.frames == 2


async def test_a_refused_storm_stream_reports_its_status() -> None:
    stream = StormStream(b"", owed=0)
    stream.data_received(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}")
    assert stream.opened.result() == 503
    lost = StormStream(b"", owed=1)
    lost.connection_lost(None)
    assert lost.opened.result() == 0
    assert lost.served.done()


def test_lag_quantiles_from_histogram_deltas() -> None:
    inf = float("inf")
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, inf: 10.0}
    after = {0.001: 110.0, 0.01: 209.0, 0.1: 210.0, inf: 210.0}  # 100 ≤1 ms, 99 ≤10 ms, 1 ≤100 ms
    assert lag_quantiles(before, after) == (10.0, 100.0)


def test_every_storm_scenario_has_a_storm() -> None:
    storms = [name for name, s in SCENARIOS.items() if s.storm]
    assert sorted(storms) == sorted(STORMS)
    assert all(SCENARIOS[name].storm == 10_000 for name in storms)
