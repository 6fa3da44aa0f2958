"""The capacity benchmark's storm and nchan pieces (loadtests/bench/, capacity.py): requests, the
streams' framing, the server loop-lag quantiles, nchan's generated configuration. No benchmark
runs here."""

from __future__ import annotations

from loadtests.bench import STREAM_PATH, nchan
from loadtests.bench.client import Run, Stream
from loadtests.bench.storm import STORMS, StormStream, storm_requests
from loadtests.capacity import SCENARIOS, lag_quantiles

from rapidphoto_contract.keys import NOTIFICATION_CHANNEL_PREFIX

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


def test_nchan_config_is_loopback_and_names_channels_as_the_contract() -> None:
    text = nchan.config(8123, "redis://127.0.0.1:6400/0", 10_000)
    assert "listen 127.0.0.1:8123 " in text
    assert 'nchan_redis_url "redis://127.0.0.1:6400/0"' in text
    assert f"location = {STREAM_PATH} " in text
    assert f'"{NOTIFICATION_CHANNEL_PREFIX}$http_x_bench_user"' in text
    assert "worker_connections 22000;" in text


async def test_streams_count_payload_ids_not_frame_ids() -> None:
    sent = memoryview(bytearray(8 * 4)).cast("d")
    run = Run(1, sent, open_mark=b"")
    stream = Stream(run, 0, b"")
    stream.data_received(HEAD)
    frame = b'id: 1701:0\ndata: {"type":"notification","eventId":"1-%d"}\n\n'
    stream.data_received(frame % 0 + frame % 1)
    stream.data_received(frame % 3)
    assert (run.delivered, run.lost, run.duplicates) == (3, 1, 0)
