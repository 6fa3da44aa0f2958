"""Every open stream of the process, and the one ticker that serves them all.

One task wakes every second and, for each open stream, asks its writer (``writer.py``) for: a
heartbeat when nothing was written for about ``SSE_HEARTBEAT_SECONDS`` (see ``heartbeat_after``);
the end with ``token-expired`` once its token's ``exp`` (plus ``JWT_LEEWAY_SECONDS``) has passed;
and an abort of a task that has been stuck in ``send`` on a client that stopped reading after its
stream was told to close. The ticker decides when; the writer does it. One ticker instead of a
timer per stream keeps an idle stream down to a few objects.

On shutdown (SIGTERM) every stream is told to close with ``shutdown``; writers still stuck after
``SHUTDOWN_ABORT_SECONDS`` are aborted, so the process is gone within PROTOCOL §5's 5 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from rapidphoto_relay.writer import StreamWriter

log = logging.getLogger("rapidphoto_relay.registry")

TICK_SECONDS: Final = 1.0
#: A writer stuck this long in ``send`` after its stream was told to close is aborted. Long enough
#: for a slow client that reads again to still get its buffered events and the STREAM_CLOSED.
ABORT_GRACE_SECONDS: Final = 10.0
#: On shutdown the whole process has 5 s (PROTOCOL §5); stuck writers get less.
SHUTDOWN_ABORT_SECONDS: Final = 2.0
#: After this many streams closed, hand freed heap memory back to the OS (see ``_malloc_trim``).
TRIM_AFTER_CLOSES: Final = 256
#: Each stream's heartbeat comes after an idle time drawn once between (1 - this) and 1 times
#: ``SSE_HEARTBEAT_SECONDS``, minus half a tick. Streams opened together (a reconnection storm)
#: would otherwise get their heartbeats in the same tick forever: with 10,000 idle streams that
#: is one burst of 10,000 writes, every stream's live events held back behind it. Half a tick
#: early because the ticker only looks once a second: never later than the setting, rather early.
HEARTBEAT_JITTER: Final = 0.25


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere.

    A stream's objects are small and freed in no particular order, so glibc keeps the freed heap
    pages; after a burst of 1,000 streams closes, RSS would stay at its peak for good (the memory is
    reused by the next streams, not leaked). Trimming after many closes returns it to the OS, so RSS
    tracks the number of open streams, which is what an operator watching it expects.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return lambda: None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


class StreamRegistry:
    def __init__(self, heartbeat_seconds: float, leeway_seconds: float) -> None:
        self._heartbeat = heartbeat_seconds
        self._leeway = leeway_seconds
        self._streams: set[StreamWriter] = set()
        self._task: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self.shutting_down = False
        self._closed_since_trim = 0
        self._trim = _malloc_trim()

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, writer: StreamWriter) -> None:
        writer.heartbeat_after = (
            self._heartbeat * (1.0 - HEARTBEAT_JITTER * random.random()) - TICK_SECONDS / 2
        )
        self._streams.add(writer)
        self._empty.clear()

    def remove(self, writer: StreamWriter) -> None:
        self._streams.discard(writer)
        self._closed_since_trim += 1
        if not self._streams:
            self._empty.set()

    async def __aenter__(self) -> StreamRegistry:
        self._task = asyncio.create_task(self._tick_forever(), name="relay-ticker")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick(time.monotonic(), time.time())
            except Exception:  # the ticker must survive anything one stream does
                log.exception("ticker failed")

    def tick(self, now: float, wall: float) -> None:
        if self._closed_since_trim >= TRIM_AFTER_CLOSES:
            self._closed_since_trim = 0
            self._trim()
        expired_at = wall - self._leeway
        for writer in self._streams:
            if writer.close_reason is None:
                if writer.expires_at <= expired_at:
                    writer.close("token-expired")
                elif (
                    now - writer.last_write >= writer.heartbeat_after
                    and writer.writing_since is None
                ):
                    writer.heartbeat()
            elif (
                writer.writing_since is not None
                and now - writer.writing_since > ABORT_GRACE_SECONDS
            ):
                writer.abort()

    async def shutdown(self, within: float) -> None:
        """Close every stream with ``shutdown``; abort the stuck ones; wait up to ``within`` seconds."""
        self.shutting_down = True
        for writer in list(self._streams):
            writer.close("shutdown")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_ABORT_SECONDS):
                await self._empty.wait()
        for writer in list(self._streams):
            writer.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, within - SHUTDOWN_ABORT_SECONDS)):
                await self._empty.wait()
