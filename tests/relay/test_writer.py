"""The per-stream bounded buffer (``rapidphoto_relay.subscriber``)."""

from __future__ import annotations

import asyncio

from rapidphoto_relay.subscriber import Message, Subscriber


def _sub(limit: int = 3) -> Subscriber:
    return Subscriber("upload-session:s", "u", limit, expires_at=1e12)


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


class _Sink:
    """Accepts messages until told to refuse (as a paused connection would)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.refuse = False

    def deliver(self, message: Message) -> bool:
        if self.refuse:
            return False
        self.written.append(message.frame)
        return True

    def heartbeat(self) -> bool:
        return not self.refuse


async def test_a_sink_takes_messages_without_waking_the_writer_until_it_refuses() -> None:
    sub = _sub(limit=10)
    sub.resync = False
    sink = _Sink()
    sub.sink = sink
    waiter = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    sub.push(Message(b"a"))
    sub.push(Message(b"b"))
    await asyncio.sleep(0)
    assert not waiter.done()  # written by the sink: nothing for the writer to do
    assert sink.written == [b"a", b"b"]
    assert sub.buffered == 0
    sink.refuse = True
    sub.push(Message(b"c"))
    assert sub.sink is None  # from now on through the buffer, in order
    sink.refuse = False
    sub.push(Message(b"d"))
    await asyncio.wait_for(waiter, 1)
    assert [m.frame for m in sub.drain()] == [b"c", b"d"]
    assert sink.written == [b"a", b"b"]


def test_overflow_is_reported_once_when_it_happens() -> None:
    calls: list[None] = []
    sub = Subscriber("c", "u", 1, 1e12, on_overflow=lambda: calls.append(None))
    sub.push(Message(b"1"))
    sub.push(Message(b"2"))
    sub.push(Message(b"3"))
    assert sub.close_reason == "slow-consumer"
    assert len(calls) == 1
