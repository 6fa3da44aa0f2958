"""The storm scenarios of a capacity run: thousands of streams opened at once (a relay restart or
failover sends its clients to the others), while bystander streams keep receiving events.

- ``STORM``: fresh notification streams (no ``Last-Event-ID``), one user each.
- ``STORM-SESSION``: fresh session streams, each answered with its ``SESSION_SNAPSHOT``.
- ``STORM-RESUME``: session streams resuming with ``Last-Event-ID``: the log's last
  :data:`REPLAYED` events replayed to each.

Sessions are seeded before the run through the worker's own commands (``tests.support.seed``), one
user per session. A storm stream is "open" when its ``retry:`` frame arrived and "served" when
every frame it is owed (the snapshot, the replayed events) arrived too; only loopback targets.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from loadtests.bench import SECRET, STREAM_PATH

from rapidphoto_contract.tokens import mint_token

#: Photos uploaded to each seeded session: its log holds SESSION_STARTED and one event per photo.
PHOTOS: Final = 4
#: Events replayed to each resuming stream (the log's last ones).
REPLAYED: Final = 3
#: Storm users and sessions are named apart from the bystanders' ``cap<n>`` users.
STORM_USER: Final = "storm{}"
STORM_SESSION: Final = "storm-s{}"


@dataclass(frozen=True)
class Storm:
    """How each storm stream is asked for, and how many ``id:`` frames it is owed."""

    kind: str  # "notifications" | "session" | "resume"
    owed: int


STORMS: Final = {
    "STORM": Storm("notifications", 0),
    "STORM-SESSION": Storm("session", 1),
    "STORM-RESUME": Storm("resume", REPLAYED),
}


class StormStream(asyncio.Protocol):
    """A stream that only checks it opened (status 200, ``retry:``) and counts its ``id:`` frames."""

    __slots__ = (
        "buf",
        "closed",
        "frames",
        "open_mark",
        "opened",
        "owed",
        "request",
        "served",
        "status",
    )

    def __init__(self, request: bytes, owed: int, open_mark: bytes = b"retry:") -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.owed = owed
        self.open_mark = open_mark  # b"": open with the head (nchan sends no retry: frame)
        self.opened: asyncio.Future[int] = loop.create_future()
        self.served: asyncio.Future[None] = loop.create_future()
        self.buf = b""
        self.frames = 0
        self.status = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.served.done():
            return  # heartbeats from here on
        self.buf += data
        if not self.opened.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.buf.split(b" ", 2)[1])
            if self.status != 200:
                self.opened.set_result(self.status)
                self.served.set_result(None)
                return
            if self.open_mark not in self.buf:
                return
            self.opened.set_result(200)
        self.frames = self.buf.count(b"\nid: ")
        if self.frames >= self.owed:
            self.served.set_result(None)
            self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(0)
        if not self.served.done():
            self.served.set_result(None)


def storm_requests(
    kind: str, port: int, count: int, log_ids: list[str] | None, user_header: str = ""
) -> list[bytes]:
    """The ``count`` requests of a storm, tokens minted beforehand (the client's cost, not the
    server's); ``log_ids[n]``: the ``Last-Event-ID`` of resuming stream ``n``; ``user_header``:
    also name the user in this header (nchan's channel)."""
    requests = []
    for n in range(count):
        token = mint_token(STORM_USER.format(n), key=SECRET, ttl_seconds=7200)
        if kind == "notifications":
            path, extra = STREAM_PATH, ""
        else:
            path = f"/api/upload/sessions/{STORM_SESSION.format(n)}/stream"
            extra = f"Last-Event-ID: {log_ids[n]}\r\n" if kind == "resume" and log_ids else ""
        if user_header:
            extra += f"{user_header}: {STORM_USER.format(n)}\r\n"
        requests.append(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {token}\r\n{extra}\r\n"
            ).encode()
        )
    return requests


async def seed_sessions(redis_url: str, count: int) -> list[str]:
    """``count`` sessions (``storm-s<n>`` of user ``storm<n>``), each with ``PHOTOS`` photos
    uploaded by the worker's commands; returns, per session, the id to resume after so that the
    last :data:`REPLAYED` log entries are replayed."""
    from tests.support.seed import seeder

    resume_after: list[str] = [""] * count

    async def one(seed: object, n: int) -> None:
        from tests.support.seed import Seeder

        assert isinstance(seed, Seeder)
        session = STORM_SESSION.format(n)
        # A busy machine's Redis can time out: the worker's commands are idempotent, so retry.
        for step in range(PHOTOS + 1):
            for attempt in range(10):
                try:
                    if step == 0:
                        await seed.start(session, STORM_USER.format(n), PHOTOS + 1)
                    else:
                        await seed.upload(session, f"p{step - 1}")
                    break
                except Exception:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
        ids = await seed.log_ids(session)
        resume_after[n] = ids[-REPLAYED - 1]

    async with seeder(redis_url) as seed:
        for start in range(0, count, 20):
            await asyncio.gather(*(one(seed, n) for n in range(start, min(count, start + 20))))
    return resume_after


async def open_storm(
    port: int, requests: list[bytes], owed: int, open_mark: bytes = b"retry:", batch: int = 500
) -> tuple[list[tuple[StormStream, asyncio.Transport]], float, float]:
    """Open every request as fast as this client can, ``batch`` connections in flight at a time.

    Returns the streams, the seconds until every one had opened (``retry:``) and until every one
    had been served (its owed frames); raises when a stream is refused."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    opened: list[tuple[StormStream, asyncio.Transport]] = []
    all_open = 0.0
    for first in range(0, len(requests), batch):
        made: list[tuple[StormStream, asyncio.Transport]] = []
        for request in requests[first : first + batch]:
            stream = StormStream(request, owed, open_mark)
            transport, _ = await loop.create_connection(lambda s=stream: s, "127.0.0.1", port)  # type: ignore[misc]
            made.append((stream, transport))
        opened += made
        statuses = await asyncio.wait_for(asyncio.gather(*(s.opened for s, _ in made)), 120)
        refused = [s for s in statuses if s != 200]
        if refused:
            raise RuntimeError(
                f"{len(refused)} of {len(made)} storm streams refused after {first} opened, "
                f"e.g. status {refused[0]}"
            )
    all_open = time.monotonic() - started
    await asyncio.wait_for(asyncio.gather(*(s.served for s, _ in opened)), 120)
    unserved = sum(1 for s, _ in opened if s.frames < owed)
    if unserved:
        raise RuntimeError(f"{unserved} storm streams did not get their {owed} frames")
    return opened, all_open, time.monotonic() - started
