"""Connections that never complete a request head: closed at a deadline, and capped in number.

Regression (issue 9, fault 4): 5,000 connections that sent ``GET … HTTP/1.1`` and one header, then
nothing, were all still open 70 s later. uvicorn has no timer before a request head is complete (its
keep-alive timer starts after a response and stops at the first byte), and no limit counted them, so
about 19,000 of them used up the relay's file descriptors and locked everyone out.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from typing import cast

import pytest

from rapidphoto_contract import keys
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay.connections import (
    HeadDeadlineProtocol,
    PendingConnections,
    raise_open_files_limit,
)
from tests.relay.conftest import Relay, RelayFactory, eventually
from tests.support.seed import Seeder
from tests.support.sse import open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"
PARTIAL_HEAD = f"GET {NOTIFICATIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    """This process holds a few thousand sockets at once: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or soft >= 5000, f"open files limit {soft}"


class Held:
    """One client connection, read until the relay closes it (what the relay sent is kept)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.received = b""
        self.closed = False
        self._task = asyncio.create_task(self._read(reader))

    @classmethod
    async def open(cls, port: int, send: bytes) -> Held:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if send:
            writer.write(send)
            await writer.drain()
        return cls(reader, writer)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
        except ConnectionError:  # closed with our unread bytes in its buffer: a reset
            pass
        self.closed = True

    async def aclose(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _open_many(port: int, count: int, send: bytes = PARTIAL_HEAD) -> list[Held]:
    gate = asyncio.Semaphore(50)  # bounded: at most 50 connects in flight, whatever the count

    async def one() -> Held:
        async with gate:
            return await Held.open(port, send)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _stream_gets_an_event(relay: Relay, seed: Seeder, user: str, marker: int) -> None:
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(user)) as stream:
        assert stream.status_code == 200
        await stream.next_frame(10)  # retry: the stream is open and subscribed
        payload = json.dumps({"type": "notification", "marker": marker})
        await seed.publish_raw(keys.notification_channel(user), payload)
        assert (await stream.next_event(10)).json()["marker"] == marker


async def test_half_sent_heads_are_closed_at_the_deadline(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    """2,000 half-sent heads, one silent connection and one keep-alive connection that half-sends
    its second request: all closed by the default 5 s head deadline, while streams are served."""
    deadline = RelayConfig().relay_request_head_timeout_seconds
    relay = relay_factory(RELAY_MAX_PENDING_CONNECTIONS="10000")  # this test is not about the cap
    held: list[Held] = []
    try:
        silent = await Held.open(relay.port, b"")
        keep_alive = await Held.open(
            relay.port, b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        await eventually(lambda: keep_alive.received.endswith(b'{"status":"ok"}'), what="200")
        keep_alive.writer.write(PARTIAL_HEAD)  # the next request on the same connection, half-sent
        held = await _open_many(relay.port, 2000)
        held += [silent, keep_alive]

        # The relay keeps serving: a stream opens and gets its events.
        await _stream_gets_an_event(relay, seed, ids("u"), 1)

        await eventually(
            lambda: all(h.closed for h in held),
            within=deadline + 20,
            what="every half-sent head closed by the relay",
        )
        timeout_answer = b"HTTP/1.1 408 Request Timeout\r\n"
        assert all(h.received.startswith(timeout_answer) for h in held[:2000])
        assert held[0].received.endswith(b'{"error": "request head not received in time"}')
        assert silent.received == b""  # nothing was asked: closed without an answer
        assert keep_alive.received.count(timeout_answer) == 1
        assert relay.metric(
            "rapidphoto_relay_connections_closed_total", 'reason="head-timeout"'
        ) >= (2002)
        assert relay.metric("rapidphoto_relay_pending_connections") == 0
        await _stream_gets_an_event(relay, seed, ids("u"), 2)
    finally:
        await asyncio.gather(*(h.aclose() for h in held))


async def test_waiting_connections_are_capped_and_streams_do_not_count(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    """Beyond RELAY_MAX_PENDING_CONNECTIONS the longest-waiting connection is closed, so a
    well-formed request still gets through while the cap is full, and an open stream (no longer
    waiting) is never closed for it."""
    cap = 300
    relay = relay_factory(
        RELAY_MAX_PENDING_CONNECTIONS=str(cap), RELAY_REQUEST_HEAD_TIMEOUT_SECONDS="300"
    )
    user = ids("u")
    held: list[Held] = []
    try:
        held = await _open_many(relay.port, 1000)
        await eventually(
            lambda: sum(h.closed for h in held) >= 1000 - cap,
            within=20,
            what="the connections beyond the cap closed",
        )
        # Closed without an answer (an EventSource retries after that), and never more than the cap
        # left open: the deadline (300 s) closed none of them.
        assert all(h.received == b"" for h in held)
        assert relay.metric("rapidphoto_relay_pending_connections") <= cap

        # The cap is full of half-sent heads, and a well-formed stream request is served.
        async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(user)) as stream:
            assert stream.status_code == 200
            await stream.next_frame(10)
            # Twice the cap's worth of new waiting connections: had the stream still counted as
            # waiting, it would be the oldest and be closed.
            more = await _open_many(relay.port, 2 * cap)
            held += more
            await eventually(
                lambda: sum(h.closed for h in more) >= cap, within=20, what="older ones closed"
            )
            channel = keys.notification_channel(user)
            await seed.publish_raw(channel, json.dumps({"type": "notification", "marker": 3}))
            assert (await stream.next_event(10)).json()["marker"] == 3
        assert (
            relay.metric("rapidphoto_relay_connections_closed_total", 'reason="head-timeout"') == 0
        )
        # 700 of the first 1,000, then 300 more: at least one per connection beyond the cap.
        assert relay.metric(
            "rapidphoto_relay_connections_closed_total", 'reason="pending-limit"'
        ) >= (1000)
    finally:
        await asyncio.gather(*(h.aclose() for h in held))


# --- the bookkeeping, in-process ----------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def close(self) -> None:
        self.closing = True


def _as_protocol(conn: _Conn) -> HeadDeadlineProtocol:
    return cast("HeadDeadlineProtocol", conn)


class _Conn:
    """Stands in for the protocol: what PendingConnections calls on a connection."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.deadline: float | None = None

    def start_head_deadline(self, seconds: float) -> None:
        self.deadline = seconds

    def cancel_head_deadline(self) -> None:
        self.deadline = None


def test_the_longest_waiting_connection_makes_room() -> None:
    """A connection that waits again after a response queues behind those that came before."""
    pending = PendingConnections(head_timeout=5, limit=2)
    a, b, c = _Conn(), _Conn(), _Conn()
    for conn in (a, b):
        pending.wait(_as_protocol(conn))
    pending.done(_as_protocol(b))  # b's head is complete
    pending.wait(_as_protocol(b))  # and its response was sent: it waits again, newest now
    pending.wait(_as_protocol(c))
    assert (a.transport.closing, a.deadline) == (True, None)
    assert not b.transport.closing
    assert not c.transport.closing
    assert (b.deadline, c.deadline, len(pending)) == (5, 5, 2)


def test_the_open_files_limit_is_raised_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    """A soft limit of 1,024 (a common default) would hold 1,000 streams, not 10,000."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard open files limit {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        with caplog.at_level("INFO", logger="rapidphoto_relay.connections"):
            assert raise_open_files_limit(needed=hard + 1) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]
        assert "RELAY_MAX_PENDING_CONNECTIONS" in caplog.records[1].getMessage()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
