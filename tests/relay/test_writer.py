"""One stream's writer (``rapidphoto_relay.writer``) in-process: the bounded buffer, the direct path,
the no-duplicate rule, coalescing and heartbeats. (Over real uvicorn: ``test_direct.py``.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rapidphoto_contract.stream_ids import parse_stream_id
from rapidphoto_relay.coalescer import Coalescer
from rapidphoto_relay.direct import DirectWriter, encode_chunk
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.payload import Message
from rapidphoto_relay.writer import StreamWriter


def _sub(limit: int = 3, **kwargs: Any) -> StreamWriter:
    return StreamWriter("upload-session:s", "u", limit, expires_at=1e12, **kwargs)


def test_push_then_drain_returns_everything_in_order_and_empties() -> None:
    sub = _sub()
    messages = [Message(b"%d" % n) for n in range(3)]
    for m in messages:
        sub.push(m)
    assert sub.drain() == messages
    assert sub.buffered == 0


def test_overflow_closes_as_slow_consumer_and_keeps_what_fitted() -> None:
    sub = _sub(limit=2)
    for n in range(5):
        sub.push(Message(b"%d" % n))
    assert sub.close_reason == "slow-consumer"
    assert [m.frame for m in sub.drain()] == [b"0", b"1"]


def test_first_close_reason_wins() -> None:
    sub = _sub()
    sub.close("shutdown")
    sub.close("token-expired")
    assert sub.close_reason == "shutdown"


async def test_wait_returns_when_a_message_arrives() -> None:
    sub = _sub()
    sub.resync = False
    waiter = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.push(Message(b"x"))
    await asyncio.wait_for(waiter, 1)


async def test_wait_ignoring_buffer_still_wakes_on_close_and_times_out() -> None:
    sub = _sub()
    sub.resync = False
    sub.push(Message(b"x"))
    await asyncio.wait_for(sub.wait(0.01, include_buffer=False), 1)  # times out quietly
    waiter = asyncio.create_task(sub.wait(include_buffer=False))
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.close("shutdown")
    await asyncio.wait_for(waiter, 1)


class _Connection(DirectWriter):
    """A connection that records what is written and can refuse (as a paused one would)."""

    __slots__ = ("refuse", "written", "wrote")

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.wrote = asyncio.Event()
        self.refuse = False

    def writable(self) -> bool:
        return not self.refuse

    def write(self, chunk: bytes) -> None:
        self.written.append(chunk)
        self.wrote.set()


def _parked(limit: int = 10, **kwargs: Any) -> tuple[StreamWriter, _Connection]:
    """A writer whose task is idle and in sync, with a direct connection."""
    writer = _sub(limit, **kwargs)
    writer.resync, writer.in_sync, writer.parked = False, True, True
    conn = writer.direct = _Connection()
    writer.last_write = time.monotonic() - 1.0  # the write interval is over
    return writer, conn


async def test_a_parked_writer_writes_without_waking_the_task_until_the_connection_refuses() -> (
    None
):
    writer, conn = _parked()
    waiter = asyncio.create_task(writer.wait())
    await asyncio.sleep(0)
    writer.push(Message(b"a"))
    await asyncio.sleep(0)
    assert not waiter.done()  # written directly: nothing for the task to do
    assert conn.written == [encode_chunk(b"a")]
    conn.refuse = True
    writer.push(Message(b"b"))
    assert not writer.parked  # from now on through the buffer, in order
    conn.refuse = False
    writer.push(Message(b"c"))
    await asyncio.wait_for(waiter, 1)
    assert [m.frame for m in writer.drain()] == [b"b", b"c"]
    assert conn.written == [encode_chunk(b"a")]


def test_the_direct_path_and_the_task_apply_the_same_no_duplicate_rule() -> None:
    """Live messages at or below the last log read's floor were written by it: dropped on both
    paths; newer ones move the cursor."""
    old, new = parse_stream_id("5-0"), parse_stream_id("6-0")
    for direct in (True, False):
        writer, conn = _parked()
        writer.parked = direct
        writer.floor = writer.cursor = old
        writer.push(Message(b"old", old))
        writer.push(Message(b"new", new))
        if not direct:
            frames, completed = writer._frames(writer.drain())
            assert (frames, completed) == ([b"new"], False)
        else:
            assert conn.written == [encode_chunk(b"new")]
        assert writer.cursor == new


def test_a_terminal_message_is_left_to_the_task_which_completes_the_session() -> None:
    writer, conn = _parked(session=True)
    writer.push(Message(b"done", parse_stream_id("7-0"), terminal=True))
    assert conn.written == []
    assert not writer.parked
    assert writer._frames(writer.drain()) == ([b"done"], True)


async def test_frames_sooner_than_the_interval_are_held_and_flushed_as_one_chunk() -> None:
    writer, conn = _parked(coalescer=Coalescer())
    writer.push(Message(b"1"))
    writer.push(Message(b"2"))
    writer.push(Message(b"3"))
    assert conn.written == [encode_chunk(b"1")]
    assert writer.held
    assert writer.buffered == 2
    conn.wrote.clear()
    await asyncio.wait_for(conn.wrote.wait(), 1)  # the coalescer's timer
    assert conn.written == [encode_chunk(b"1"), encode_chunk(b"23")]
    assert not writer.held
    assert writer.buffered == 0


def test_a_parked_writer_takes_its_heartbeat_directly_otherwise_the_task_is_asked() -> None:
    writer, conn = _parked()
    writer.heartbeat()
    assert conn.written == [b"d\r\n: heartbeat\n\n\r\n"]
    assert not writer.heartbeat_due
    conn.refuse = True
    writer.heartbeat()
    assert writer.heartbeat_due  # the connection could not take it: the task writes it
    idle = _sub()
    idle.heartbeat()
    assert idle.heartbeat_due


def test_overflow_is_reported_once_when_it_happens() -> None:
    metrics = RelayMetrics()
    sub = StreamWriter("c", "u", 1, 1e12, metrics=metrics)
    sub.push(Message(b"1"))
    sub.push(Message(b"2"))
    sub.push(Message(b"3"))
    assert sub.close_reason == "slow-consumer"
    assert metrics.registry.get_sample_value("rapidphoto_relay_slow_consumer_closes_total") == 1


def test_a_resync_request_stops_direct_writes_until_the_log_was_read() -> None:
    """Regression: the hub's resubscription asked a parked writer to resync, but the writer stayed
    parked until its task ran; a live message read right after the confirmation was written
    directly and moved the cursor past the events published during the outage, so the log read
    that followed skipped them (one event lost after ``CLIENT KILL TYPE pubsub``)."""
    writer, conn = _parked()
    writer.cursor = parse_stream_id("5-0")
    writer.request_resync()
    writer.push(Message(b"after the outage", parse_stream_id("7-0")))
    assert conn.written == []  # not written ahead of the log read …
    assert writer.cursor == parse_stream_id("5-0")  # … which resumes after 5-0, so 6-0 is read
    assert [m.frame for m in writer.drain()] == [b"after the outage"]
