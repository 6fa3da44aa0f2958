"""The benchmark's SSE client: one raw ``asyncio.Protocol`` per stream, HTTP/1.1 by hand.

Each read is scanned with ``bytes.count``/``rfind`` (C speed) for ``id:`` lines; the ids carry
each channel's sequence number, so every stream checks *every* event it gets (lost, duplicate)
and records the latency of every delivery, not a sample. No HTTP library: at 100,000 deliveries/s
on one core, parsing is most of this client's cost.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Final

from loadtests.bench import SECRET, STREAM_PATH, user_of

from rapidphoto_contract.tokens import mint_token

#: How a payload's id starts (compact JSON, as the publisher writes it).
EVENT_ID: Final = b'"eventId":"'


class Run:
    """What every stream of one run shares: send times, latencies, counters."""

    def __init__(
        self,
        channels: int,
        sent: memoryview[float],
        open_mark: bytes = b"retry:",
        marker: bytes = EVENT_ID,
    ) -> None:
        self.channels = channels
        #: What starts the id of a counted payload (``bench/sessions.py``: published events only,
        #: not the snapshots, whose payloads carry an ``eventId`` too).
        self.marker = marker
        #: What says a stream is open once its head arrived (b"": the head itself, for a server
        #: that sends no ``retry:`` frame, nchan).
        self.open_mark = open_mark
        self.sent = sent  # sent[seq * channels + channel]: the publisher's CLOCK_MONOTONIC stamp
        self.latencies = array("d")
        self.delivered = 0
        self.lost = 0
        self.duplicates = 0
        self.closed_early = 0
        self.last_arrival = 0.0
        #: While set, every delivery's latency is also kept here (a storm's bystanders).
        self.window: array[float] | None = None
        self.storm_latencies: array[float] = array("d")


class Stream(asyncio.Protocol):
    """One SSE stream: request, status, ``retry:``, then counting and timing every event frame.

    Payloads carry ``"eventId":"1-<seq>"``, ``seq`` counting the events of the stream's channel from
    0 (the payload's id, not the frame's ``id:`` line: nchan numbers frames its own way). A read
    holding n complete frames whose last id is L holds L-n+1 … L when nothing is lost or repeated
    (frames of a channel arrive in order), so one ``count`` and one ``rfind`` check a whole read.
    """

    __slots__ = ("channel", "closed", "expected", "head", "opened", "request", "run", "tail")

    def __init__(self, run: Run, channel: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.run = run
        self.channel = channel
        self.request = request
        self.opened: asyncio.Future[int] = loop.create_future()
        self.closed = False
        self.head = True
        self.tail = b""
        self.expected = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        if not self.opened.done():
            if self.head:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.tail = buf
                    return
                status = int(buf.split(b" ", 2)[1])
                if status != 200:
                    self.opened.set_result(status)
                    self.tail = b""
                    return
                self.head = False
                buf = buf[end + 4 :]
            if self.run.open_mark not in buf:
                self.tail = buf
                return
            self.opened.set_result(200)
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        self.tail = buf[end + 2 :]
        marker = self.run.marker
        count = buf.count(marker, 0, end)
        if not count:
            return  # heartbeats, the retry frame
        now = time.monotonic()
        start = buf.rfind(marker, 0, end) + len(marker)
        dash = buf.index(b"-", start)
        last = int(buf[dash + 1 : buf.index(b'"', dash)])
        first = last - count + 1
        run = self.run
        if first > self.expected:
            run.lost += first - self.expected
        elif first < self.expected:
            run.duplicates += self.expected - first
            first = self.expected
        self.expected = last + 1
        sent, channels, channel = run.sent, run.channels, self.channel
        latencies = run.latencies
        for seq in range(first, last + 1):
            latencies.append(now - sent[seq * channels + channel])
        if run.window is not None:
            for seq in range(first, last + 1):
                run.window.append(now - sent[seq * channels + channel])
        run.delivered += last + 1 - first
        run.last_arrival = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(0)

    def owed(self, per_channel: list[int]) -> int:
        """Deliveries this stream is owed when ``per_channel[c]`` events went to channel c."""
        return per_channel[self.channel]

    def missing(self, per_channel: list[int]) -> int:
        """Of those, what never arrived (at the end of the stream)."""
        return max(0, per_channel[self.channel] - self.expected)


async def open_streams(
    port: int, run: Run, streams: int, channels: int, batch: int = 500, user_header: str = ""
) -> list[tuple[Stream, asyncio.Transport]]:
    """``streams`` streams, stream n on channel n % channels (one user per channel);
    ``user_header``: also name the user in this header (nchan's channel)."""
    loop = asyncio.get_running_loop()
    requests = [
        (
            f"GET {STREAM_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: text/event-stream\r\nAuthorization: Bearer "
            f"{mint_token(user_of(c), key=SECRET, ttl_seconds=7200)}\r\n"
            + (f"{user_header}: {user_of(c)}\r\n" if user_header else "")
            + "\r\n"
        ).encode()
        for c in range(min(channels, streams))
    ]
    opened: list[tuple[Stream, asyncio.Transport]] = []
    for start in range(0, streams, batch):
        made: list[tuple[Stream, asyncio.Transport]] = []
        for n in range(start, min(streams, start + batch)):
            stream = Stream(run, n % channels, requests[n % channels])
            transport, _ = await loop.create_connection(lambda s=stream: s, "127.0.0.1", port)  # type: ignore[misc]
            made.append((stream, transport))
        statuses = await asyncio.wait_for(asyncio.gather(*(s.opened for s, _ in made)), 120)
        refused = [s for s in statuses if s != 200]
        opened += made
        if refused:
            raise RuntimeError(
                f"{len(refused)} of {len(made)} streams refused after {start} opened, "
                f"e.g. status {refused[0]}"
            )
    return opened


async def watch_loop_lag(lags: array[float], interval: float = 0.005) -> None:
    """How late this client's event loop runs a timer: when it lags, so do its reads (and the
    latency it reports) — the client's own share of every latency figure."""
    while True:
        due = time.monotonic() + interval
        await asyncio.sleep(interval)
        # uvloop's timers have a resolution of 1 ms: up to that is not lag
        lags.append(max(0.0, time.monotonic() - due - 0.001))


async def drain(run: Run, opened: list[tuple[Stream, asyncio.Transport]], published: int) -> int:
    """After ``published`` events: wait until everything arrived, or nothing moved for 3 s
    (bounded either way), then count what never arrived at the end of each stream as lost.
    Returns the number of deliveries expected."""
    per_channel = [len(range(c, published, run.channels)) for c in range(run.channels)]
    expected = sum(s.owed(per_channel) for s, _ in opened)
    last, quiet_since = -1, time.monotonic()
    while run.delivered + run.lost < expected:
        await asyncio.sleep(0.05)
        if run.delivered != last:
            last, quiet_since = run.delivered, time.monotonic()
        elif time.monotonic() - quiet_since > 3.0:
            break
    for stream, _ in opened:
        run.lost += stream.missing(per_channel)
    return expected
