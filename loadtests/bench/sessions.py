"""The session scenarios of a capacity run: the multi-session stream (PROTOCOL §5.1) against single
session streams over the same sessions and the same events.

- ``MULTI8``: each client holds ONE multi-session stream of :data:`PER_CLIENT` sessions
  (``/api/upload/sessions/stream?session=…``): every delivery is framed with the stream's cursor.
- ``SINGLE8``: one session stream (``/api/upload/sessions/{id}/stream``) per session: every
  delivery is the hub's shared frame.

Sessions ``mb-s<n>`` of users ``mb<n % (sessions / 8)>`` are seeded once per run through the worker's own
commands (``tests.support.seed``: state hash, log with ``SESSION_STARTED``), so both streams open
on real sessions: the single streams with their ``SESSION_SNAPSHOT``, the multi streams with one
snapshot per session. The publisher (``notify_publisher.py --sessions``) then publishes
``PHOTO_UPLOADED`` payloads as the worker would, on the session channels, with log ids
``<ms>-<seq>`` newer than the seeded logs and increasing per channel, so the relays treat them as
log entries (the multi stream moves its cursor on each). The clients count only those payloads
(:data:`MARKER`), not the snapshots: a multi stream checks the sequence of each of its sessions.

A multi stream's sessions are strided (stream k of S: sessions k, k + S, … k + 7S), so the
publisher's round-robin gives every stream one event at a time, as it gives every single stream:
with consecutive sessions a stream would get 8 events in a row, which its writer coalesces into
fewer writes, and the comparison would measure that instead of the cost of a delivery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from loadtests.bench import SECRET, procfs
from loadtests.bench.client import Run, Stream

from rapidphoto_contract.events import PHOTO_UPLOADED
from rapidphoto_contract.tokens import mint_token

if TYPE_CHECKING:
    from loadtests.bench.report import Result

#: Sessions per client: a multi stream carries this many; single-stream users hold this many.
PER_CLIENT: Final = 8
#: What starts the payload of a published event (compact JSON, fields in the contract's order):
#: the seeded logs' ``SESSION_STARTED`` and the snapshots never match it.
MARKER: Final = b'{"type":"' + PHOTO_UPLOADED.encode() + b'","eventId":"'
#: Where the session's number follows in such a payload (``sessionId`` comes after ``eventId``).
SESSION_FIELD: Final = b'"sessionId":"mb-s'
#: Photos announced by each seeded session: the run never completes one.
TOTAL_PHOTOS: Final = 1_000_000
MULTI_PATH: Final = "/api/upload/sessions/stream"


def session_of(n: int) -> str:
    return f"mb-s{n}"


def owner_of(n: int, sessions: int) -> str:
    """The owner of session ``n`` of ``sessions``: the 8 sessions of a multi stream (:func:`lanes_of`)
    are one user's, ``mb<n % (sessions / 8)>``."""
    return f"mb{n % max(1, sessions // PER_CLIENT)}"


def lanes_of(kind: str, k: int, sessions: int) -> tuple[int, ...]:
    """The session numbers (= publisher channels) stream ``k`` carries: "multi", sessions k, k + S,
    … k + 7S (S = sessions / 8, the number of multi streams); "single", session k % sessions."""
    if kind == "multi":
        stride = max(1, sessions // PER_CLIENT)
        first = k % stride
        return tuple(first + i * stride for i in range(PER_CLIENT))
    return (k % sessions,)


def requests(kind: str, port: int, streams: int, sessions: int) -> list[bytes]:
    """One request per stream ``k``, for the sessions of :func:`lanes_of` (``kind`` "multi" or
    "single"), as their owner. Tokens minted here, not on the server's time."""
    out: list[bytes] = []
    tokens: dict[str, str] = {}
    for k in range(streams):
        lanes = lanes_of(kind, k, sessions)
        user = owner_of(lanes[0], sessions)
        if kind == "multi":
            query = "&".join(f"session={session_of(n)}" for n in lanes)
            path = f"{MULTI_PATH}?{query}"
        else:
            path = f"/api/upload/sessions/{session_of(lanes[0])}/stream"
        token = tokens.get(user)
        if token is None:
            token = tokens[user] = mint_token(user, key=SECRET, ttl_seconds=7200)
        out.append(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
    return out


class MultiStream(Stream):
    """A multi-session stream: the frames of its sessions interleave, so each published payload is
    found (:data:`MARKER`), its session read (:data:`SESSION_FIELD`) and checked against that
    session's sequence. The frames' ``id:`` lines (cursors) are not parsed: the payload says it all."""

    __slots__ = ("lanes", "next_seq")

    def __init__(self, run: Run, lanes: tuple[int, ...], request: bytes) -> None:
        super().__init__(run, lanes[0], request)
        self.lanes = lanes
        #: The next sequence number expected from each session.
        self.next_seq = dict.fromkeys(lanes, 0)

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        if not self.opened.done():
            self.tail = b""
            Stream.data_received(self, buf)  # the head and ``retry:``, as a single stream
            return
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        self.tail = buf[end + 2 :]
        self.count(buf, end)

    def count(self, buf: bytes, end: int) -> None:
        marker, field, run = MARKER, SESSION_FIELD, self.run
        start = buf.find(marker, 0, end)
        if start < 0:
            return  # heartbeats, snapshots
        now = time.monotonic()
        sent, channels, next_seq = run.sent, run.channels, self.next_seq
        while start >= 0:
            dash = buf.index(b"-", start + len(marker))
            seq = int(buf[dash + 1 : buf.index(b'"', dash)])
            at = buf.index(field, dash) + len(field)
            channel = int(buf[at : buf.index(b'"', at)])
            expected = next_seq.get(channel)
            if expected is None:
                run.lost += 1  # another session's event: never on this stream
            elif seq < expected:
                run.duplicates += 1
            else:
                run.lost += seq - expected
                next_seq[channel] = seq + 1
                run.delivered += 1
                run.latencies.append(now - sent[seq * channels + channel])
                if run.window is not None:
                    run.window.append(now - sent[seq * channels + channel])
                run.last_arrival = now
            start = buf.find(marker, at, end)

    def owed(self, per_channel: list[int]) -> int:
        return sum(per_channel[c] for c in self.lanes)

    def missing(self, per_channel: list[int]) -> int:
        return sum(max(0, per_channel[c] - self.next_seq[c]) for c in self.lanes)


async def open_session_streams(
    kind: str, port: int, run: Run, streams: int, sessions: int, batch: int = 500
) -> list[tuple[Stream, asyncio.Transport]]:
    """``streams`` streams of ``kind`` ("multi" or "single") over ``sessions`` seeded sessions,
    ``batch`` connections in flight at a time; raises when one is refused."""
    loop = asyncio.get_running_loop()
    wanted = requests(kind, port, streams, sessions)
    opened: list[tuple[Stream, asyncio.Transport]] = []
    for first in range(0, streams, batch):
        made: list[tuple[Stream, asyncio.Transport]] = []
        for k in range(first, min(streams, first + batch)):
            lanes = lanes_of(kind, k, sessions)
            stream = (
                MultiStream(run, lanes, wanted[k])
                if kind == "multi"
                else Stream(run, lanes[0], wanted[k])
            )
            transport, _ = await loop.create_connection(lambda s=stream: s, "127.0.0.1", port)  # type: ignore[misc]
            made.append((stream, transport))
        statuses = await asyncio.wait_for(asyncio.gather(*(s.opened for s, _ in made)), 120)
        opened += made
        refused = [s for s in statuses if s != 200]
        if refused:
            raise RuntimeError(
                f"{len(refused)} of {len(made)} {kind} streams refused after {first} opened, "
                f"e.g. status {refused[0]}"
            )
    return opened


async def seed(redis_url: str, count: int) -> None:
    """``count`` sessions ``mb-s<n>`` of users :func:`owner_of`, started by the worker's command (a
    state hash and a log holding ``SESSION_STARTED``), 50 at a time."""
    from tests.support.seed import seeder

    async with seeder(redis_url) as seeded:
        for first in range(0, count, 50):
            await asyncio.gather(
                *(
                    seeded.start(session_of(n), owner_of(n, count), TOTAL_PHOTOS)
                    for n in range(first, min(count, first + 50))
                )
            )


_seeded: set[tuple[str, int]] = set()


async def ensure_seeded(redis_url: str, count: int) -> None:
    """:func:`seed` once per Redis and count: every scenario of a run reads the same sessions."""
    if (redis_url, count) not in _seeded:
        print(f"   seeding {count:,} sessions", flush=True)
        started = time.monotonic()
        await seed(redis_url, count)
        print(f"   seeded in {time.monotonic() - started:.0f} s", flush=True)
        _seeded.add((redis_url, count))


async def idle_cpu_share(pid: int, seconds: float) -> float:
    """The share of a core the server (and its children) used over ``seconds`` of doing nothing
    but holding its streams: subtracted from a run's CPU, what is left is the deliveries' cost."""
    pids = procfs.process_tree(pid)
    cpu0, t0 = procfs.tree_cpu(pids), time.monotonic()
    await asyncio.sleep(seconds)
    return (procfs.tree_cpu(pids) - cpu0) / (time.monotonic() - t0)


def compare(results: Sequence[Result]) -> None:
    """The goal of the multi-session stream: each MULTI8 result gets a check against the SINGLE8
    result of the same target, CPU per delivery with and without the streams' idle cost."""
    single = {r.target: r for r in results if r.scenario == "SINGLE8" and r.delivered}
    for multi in results:
        other = single.get(multi.target)
        if multi.scenario != "MULTI8" or other is None or not multi.delivered:
            continue
        for name, mine, theirs in (
            ("µs", multi.us_per_delivery, other.us_per_delivery),
            ("net µs", multi.net_us_per_delivery, other.net_us_per_delivery),
        ):
            verdict = "PASS" if mine <= theirs else "FAIL"
            multi.verdict.append(f"{verdict} {name} ≤ SINGLE8's ({mine:.1f} vs {theirs:.1f})")
