"""The hub against an in-memory transport (pure unit tests; real Redis everywhere else).

The fake server answers SUBSCRIBE/UNSUBSCRIBE/PING like Redis in RESP2 and can delay replies or
drop the connection, which is what the hub's confirmation and reconnection logic is about.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from rapidphoto_relay.hub import Hub, HubUnavailable
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.writer import StreamWriter


class FakeConnection:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.inbox: asyncio.Queue[list[Any] | Exception] = asyncio.Queue()
        self.channels: set[bytes] = set()
        self.sent: list[tuple[str, ...]] = []
        self.closed = False
        self.hold_replies = False
        self.held: list[list[Any]] = []

    async def send(self, *args: str | bytes) -> None:
        if self.closed:
            raise RedisConnectionError("closed")
        words = tuple(a.decode() if isinstance(a, bytes) else a for a in args)
        self.sent.append(words)
        command, names = words[0].upper(), [n.encode() for n in words[1:]]
        for name in names:
            if command == "SUBSCRIBE":
                self.channels.add(name)
            elif command == "UNSUBSCRIBE":
                self.channels.discard(name)
            self._reply([command.lower().encode(), name, len(self.channels)])
        if command == "PING":
            self._reply([b"pong", b""])

    def _reply(self, reply: list[Any]) -> None:
        if self.hold_replies:
            self.held.append(reply)
        else:
            self.inbox.put_nowait(reply)

    def release(self) -> None:
        self.hold_replies = False
        for reply in self.held:
            self.inbox.put_nowait(reply)
        self.held.clear()

    async def read(self) -> list[Any]:
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        self.closed = True
        self.inbox.put_nowait(RedisConnectionError("closed"))


class FakeServer:
    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self.up = True

    async def connect(self) -> FakeConnection:
        if not self.up:
            raise RedisConnectionError("refused")
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    @property
    def conn(self) -> FakeConnection:
        return self.connections[-1]

    def publish(self, channel: str, data: bytes) -> None:
        for conn in self.connections:
            if not conn.closed and channel.encode() in conn.channels:
                conn.inbox.put_nowait([b"message", channel.encode(), data])

    def crash(self) -> None:
        for conn in self.connections:
            if not conn.closed:
                conn.inbox.put_nowait(RedisConnectionError("connection reset"))


def _sub(channel: str = "upload-session:s", limit: int = 100) -> StreamWriter:
    sub = StreamWriter(channel, "u", limit, expires_at=1e12)
    sub.resync = False
    return sub


async def _hub(server: FakeServer, **kwargs: Any) -> Hub:
    hub = Hub(server, RelayMetrics(), backoff_base=0.01, backoff_cap=0.02, **kwargs)
    await hub.__aenter__()
    await _until(lambda: hub.connected)
    return hub


async def _until(predicate: Any, within: float = 2.0) -> None:
    """Poll a condition of in-memory state (no I/O to wait on) with a deadline."""
    async with asyncio.timeout(within):
        for _ in iter(int, 1):
            if predicate():
                return
            await asyncio.sleep(0.001)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_subscription_per_channel_and_one_frame_for_all_subscribers() -> None:
    server = FakeServer()
    hub = await _hub(server)
    a, b = _sub(), _sub()
    await hub.subscribe(a.channel, a)
    await hub.subscribe(b.channel, b)
    assert server.conn.sent == [("SUBSCRIBE", a.channel)]
    server.publish(a.channel, b'{"type":"T","eventId":"1-0"}')
    await _settle()
    [ma], [mb] = a.drain(), b.drain()
    assert ma is mb  # framed once, the same object handed to both
    assert ma.frame.startswith(b"id: 1-0\nevent: T\n")
    await hub.__aexit__()


async def test_channels_subscribed_together_share_one_subscribe() -> None:
    """A burst of streams opening at once (a reconnection storm) costs one SUBSCRIBE, not one each;
    a channel left before the batch went out is not subscribed at all."""
    server = FakeServer()
    hub = await _hub(server)
    subs = [_sub(f"upload-session:s{n}") for n in range(3)]
    gone = _sub("upload-session:gone")
    pending = [asyncio.ensure_future(hub.subscribe(s.channel, s)) for s in [*subs, gone]]
    await asyncio.sleep(0)  # every subscribe has registered its channel
    hub.unsubscribe(gone.channel, gone)
    await asyncio.wait_for(asyncio.gather(*pending[:3]), 2)
    assert server.conn.sent == [("SUBSCRIBE", *(s.channel for s in subs))]
    pending[3].cancel()
    await hub.__aexit__()


async def test_subscribe_returns_only_after_redis_confirms() -> None:
    server = FakeServer()
    hub = await _hub(server)
    server.conn.hold_replies = True
    sub = _sub()
    pending = asyncio.create_task(hub.subscribe(sub.channel, sub))
    await _settle()
    assert not pending.done()
    assert hub.ready  # a new channel awaiting its confirmation does not make the hub unready
    server.conn.release()
    await asyncio.wait_for(pending, 1)
    assert hub.ready
    await hub.__aexit__()


async def test_unconfirmed_subscription_times_out_and_is_undone() -> None:
    server = FakeServer()
    hub = await _hub(server)
    server.conn.hold_replies = True
    sub = _sub()
    with pytest.raises(HubUnavailable):
        await hub.subscribe(sub.channel, sub, within=0.05)
    assert hub.channel_count == 0
    await hub.__aexit__()


async def test_last_subscriber_out_unsubscribes_and_stale_reply_does_not_confirm() -> None:
    server = FakeServer()
    hub = await _hub(server)
    first = _sub()
    await hub.subscribe(first.channel, first)
    hub.unsubscribe(first.channel, first)
    await _settle()
    assert server.conn.sent[-1] == ("UNSUBSCRIBE", first.channel)
    assert hub.channel_count == 0
    # Re-subscribe while the unsubscribe reply is still in flight: only the newest reply confirms.
    server.conn.hold_replies = True
    hub.unsubscribe(first.channel, first)  # no-op: already gone
    second = _sub()
    task = asyncio.create_task(hub.subscribe(second.channel, second))
    await _settle()
    assert not task.done()
    server.conn.release()
    await asyncio.wait_for(task, 1)
    assert second.channel.encode() in server.conn.channels
    await hub.__aexit__()


async def test_invalid_payloads_are_dropped_and_counted_and_reading_goes_on() -> None:
    server = FakeServer()
    hub = await _hub(server)
    sub = _sub()
    await hub.subscribe(sub.channel, sub)
    for junk in (b"nope", b"[]", b'{"type":"bad type"}', b"{" + b" " * 70000 + b"}"):
        server.publish(sub.channel, junk)
    server.publish(sub.channel, b'{"type":"ok"}')
    await _settle()
    assert [m.frame for m in sub.drain()] == [b'event: ok\ndata: {"type":"ok"}\n\n']
    dropped = hub._metrics.events_dropped  # the metric is the observable here
    total = sum(
        s.value for metric in dropped.collect() for s in metric.samples if s.name.endswith("_total")
    )
    assert total == 4
    await hub.__aexit__()


class _BrokenSubscriber(StreamWriter):
    """Stands for any bug in handling one message (framing, dispatch, a stream's push)."""

    def push(self, message: object) -> None:
        raise RuntimeError("a bug in one message's handling")


async def test_an_error_handling_one_message_drops_that_message_not_the_connection() -> None:
    """Issue 9, fault 1: an exception raised while handling one message (there a ValueError from a
    payload that failed to decode) reached the reader loop, which dropped the connection that every
    stream of the relay shares. Each message is handled in isolation: counted as ``internal``."""
    server = FakeServer()
    hub = await _hub(server)
    broken = _BrokenSubscriber("upload-session:broken", "u", 100, expires_at=1e12)
    broken.resync = False
    sub = _sub()
    await hub.subscribe(broken.channel, broken)
    await hub.subscribe(sub.channel, sub)
    server.publish(broken.channel, b'{"type":"ok"}')
    server.publish(sub.channel, b'{"type":"after"}')
    await _settle()
    assert [m.frame for m in sub.drain()] == [b'event: after\ndata: {"type":"after"}\n\n']
    assert len(server.connections) == 1  # never reconnected
    assert hub.connected
    assert hub._metrics.events_dropped.labels("internal")._value.get() == 1
    await hub.__aexit__()


async def test_full_buffer_closes_only_that_subscriber() -> None:
    server = FakeServer()
    hub = await _hub(server)
    slow, fast = _sub(limit=2), _sub(limit=100)
    await hub.subscribe(slow.channel, slow)
    await hub.subscribe(fast.channel, fast)
    for n in range(5):
        server.publish(slow.channel, b'{"type":"T","n":%d}' % n)
    await _settle()
    assert slow.close_reason == "slow-consumer"
    assert fast.close_reason is None
    assert len(fast.drain()) == 5
    await hub.__aexit__()


async def test_reconnect_resubscribes_everything_then_asks_streams_to_resync() -> None:
    server = FakeServer()
    hub = await _hub(server)
    subs = [_sub(f"upload-session:s{n}") for n in range(3)]
    for sub in subs:
        await hub.subscribe(sub.channel, sub)
    server.up = False
    server.crash()
    await _until(lambda: not hub.connected)
    assert not hub.ready
    assert not any(sub.resync for sub in subs)
    server.up = True
    await _until(lambda: hub.ready)
    assert sorted(c.decode() for c in server.conn.channels) == sorted(s.channel for s in subs)
    assert all(sub.resync for sub in subs)
    await hub.__aexit__()


async def test_silent_connection_is_pinged_then_replaced() -> None:
    server = FakeServer()
    hub = await _hub(server, ping_interval=0.02)
    first = server.conn
    await asyncio.sleep(0.1)
    assert ("PING",) in first.sent
    assert not first.closed  # it answered
    first.send = _swallow  # type: ignore[method-assign]  # a link that silently eats everything
    await _until(lambda: server.conn is not first)
    assert first.closed
    await hub.__aexit__()


async def _swallow(*args: str | bytes) -> None:
    return None
