"""The capacity benchmark's session scenarios (loadtests/bench/sessions.py): the requests, the
publisher's session payloads as the relay parses them, and the multi stream's per-session checks.
No benchmark runs here."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import jwt
from loadtests.bench.client import Run, Stream
from loadtests.bench.notify_publisher import session_payload
from loadtests.bench.report import Result, row
from loadtests.bench.sessions import MARKER, MultiStream, compare, lanes_of, owner_of, requests
from loadtests.capacity import SCENARIOS

from rapidphoto_relay.payload import parse_payload

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


def _path_and_user(request: bytes) -> tuple[str, str]:
    lines = request.decode().split("\r\n")
    token = next(line for line in lines if line.startswith("Authorization: "))
    return lines[0].split(" ")[1], str(
        jwt.decode(token.split(" ")[-1], options={"verify_signature": False})["sub"]
    )


def test_a_multi_request_asks_for_eight_strided_sessions_of_its_user() -> None:
    multi = requests("multi", 8000, 3, 24)
    path, user = _path_and_user(multi[2])
    url = urlsplit(path)
    assert url.path == "/api/upload/sessions/stream"
    # one stream per 3 consecutive events of the round-robin: no burst to coalesce
    assert parse_qs(url.query)["session"] == [f"mb-s{n}" for n in range(2, 24, 3)]
    assert user == "mb2"
    assert lanes_of("multi", 2, 24) == tuple(range(2, 24, 3))
    assert sorted(n for k in range(3) for n in lanes_of("multi", k, 24)) == list(range(24))


def test_single_requests_cover_the_same_sessions_with_their_owners() -> None:
    single = requests("single", 8000, 24, 24)
    path, user = _path_and_user(single[17])
    assert path == "/api/upload/sessions/mb-s17/stream"
    assert user == "mb2"  # as for the multi stream holding mb-s17
    assert owner_of(17, 24) == "mb2"
    assert lanes_of("single", 17, 24) == (17,)


def test_a_session_payload_is_a_log_entry_to_the_relay() -> None:
    payload = session_payload(5, 7, 1_800_000_000_000, "2027-01-15T08:00:00.000Z")
    message = parse_payload(payload.encode())
    assert message.stream_id == (1_800_000_000_000, 7)  # a cursor-moving log id, not "1-7"
    assert not message.terminal
    assert payload.encode().startswith(MARKER)
    assert json.loads(payload)["sessionId"] == "mb-s5"


def _frame(channel: int, seq: int) -> bytes:
    payload = session_payload(channel, seq, 1_800_000_000_000, "2027-01-15T08:00:00.000Z")
    return f"id: m1.whatever~1-1\nevent: PHOTO_UPLOADED\ndata: {payload}\n\n".encode()


async def test_a_multi_stream_checks_each_of_its_sessions() -> None:
    sent = memoryview(bytearray(8 * 16 * 4)).cast("d")
    run = Run(16, sent, marker=MARKER)
    stream = MultiStream(run, tuple(range(8, 16)), b"")
    snapshot = b'id: m1.x~1-0\nevent: SESSION_SNAPSHOT\ndata: {"type":"SESSION_SNAPSHOT","eventId":"1-0"}\n\n'
    stream.data_received(HEAD + b"retry: 2000\n\n" + snapshot)
    assert stream.opened.result() == 200
    stream.data_received(_frame(8, 0) + _frame(9, 0) + _frame(8, 1)[:30])
    stream.data_received(_frame(8, 1)[30:] + _frame(9, 2))  # 9's seq 1 lost
    stream.data_received(_frame(8, 1) + _frame(3, 0))  # a duplicate, another stream's session
    assert (run.delivered, run.lost, run.duplicates) == (4, 2, 1)
    per_channel = [3] * 16
    assert stream.owed(per_channel) == 24
    assert stream.missing(per_channel) == 1 + 0 + 6 * 3  # 8 owes seq 2; 9 is done; 10 to 15 all


async def test_a_single_stream_counts_events_not_its_snapshot() -> None:
    sent = memoryview(bytearray(8 * 8)).cast("d")
    run = Run(8, sent, marker=MARKER)
    stream = Stream(run, 5, b"")
    snapshot = (
        b'id: 1-0\nevent: SESSION_SNAPSHOT\ndata: {"type":"SESSION_SNAPSHOT","eventId":"1-0"}\n\n'
    )
    stream.data_received(HEAD + b"retry: 2000\n\n" + snapshot)
    stream.data_received(_frame(5, 0))
    assert (run.delivered, run.lost, run.duplicates) == (1, 0, 0)


def test_multi_is_compared_with_single_per_delivery() -> None:
    assert SCENARIOS["MULTI8"].channels == SCENARIOS["SINGLE8"].channels == 8000
    assert SCENARIOS["MULTI8"].streams * 8 == SCENARIOS["SINGLE8"].streams
    multi = Result("MULTI8", "relay", 1000, 8000, 100.0, delivered=10, sessions=8000)
    single = Result("SINGLE8", "relay", 8000, 8000, 100.0, delivered=10, sessions=8000)
    multi.us_per_delivery, multi.net_us_per_delivery = 30.0, 12.0
    single.us_per_delivery, single.net_us_per_delivery = 60.0, 10.0
    compare([multi, single])
    assert multi.verdict == [
        "PASS µs ≤ SINGLE8's (30.0 vs 60.0)",
        "FAIL net µs ≤ SINGLE8's (12.0 vs 10.0)",
    ]
    multi.kib_per_stream, multi.load_before, multi.load_after = 80.0, "1.0", "1.0"
    assert "80.0 (10.00 per session)" in row(multi)
