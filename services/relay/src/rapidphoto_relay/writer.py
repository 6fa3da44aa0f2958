"""One open stream's state: its bounded buffer, cursor and close reason (CONVENTIONS §6).

The hub calls :meth:`Subscriber.push` from its single reader task; it never blocks and never
allocates per message beyond a list slot: the :class:`Message` (already framed as SSE bytes) is
shared by every subscriber of the channel. A full buffer closes this stream only, with
``slow-consumer`` (PROTOCOL §5); the client resumes with ``Last-Event-ID``.

The stream's writer (``streams.py``) sleeps in :meth:`wait` and, when woken, takes *everything*
buffered with :meth:`drain` and writes it in one ``send``: under load that batches many events into
one syscall instead of waking once per event. While the writer is idle and in sync it also lends
the subscriber a :class:`Sink` (``streams.py``, ``direct.py``): :meth:`Subscriber.push` then hands
a message straight to the connection without waking the writer at all, and falls back to the
buffer (and the writer) as soon as that cannot be done at once, so the order of frames never
changes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Final, Literal, Protocol, TypeAlias

from rapidphoto_contract.stream_ids import StreamId

#: Why a stream ends. The first five are sent to the client as ``STREAM_CLOSED`` reasons (PROTOCOL §5);
#: ``disconnected`` (the client went away) and ``aborted`` (a writer stuck on a client that stopped
#: reading) are not, as there is nobody left to tell.
CloseReason: TypeAlias = Literal[
    "completed",
    "token-expired",
    "slow-consumer",
    "shutdown",
    "forbidden",
    "session-not-found",
    "disconnected",
]
DISCONNECTED: Final = "disconnected"


class Message:
    """A channel message as the hub framed it once, shared by every subscriber.

    ``stream_id`` is the parsed ``eventId`` when it is a log entry id (``None`` for raw publishes
    without one); ``terminal`` marks a ``SESSION_COMPLETED`` from the log, after which a session
    stream closes (PROTOCOL §5); ``occurred_at`` is the publisher's clock (epoch seconds) for the lag
    histogram, observed once per message and process (``observed``).
    """

    __slots__ = ("chunk", "frame", "observed", "occurred_at", "stream_id", "terminal")

    def __init__(
        self,
        frame: bytes,
        stream_id: StreamId | None = None,
        *,
        terminal: bool = False,
        occurred_at: float | None = None,
    ) -> None:
        self.frame = frame
        self.stream_id = stream_id
        self.terminal = terminal
        self.occurred_at = occurred_at
        self.observed = occurred_at is None
        #: ``frame`` as an HTTP/1.1 chunk, encoded by the first direct write and then shared.
        self.chunk: bytes | None = None


class Sink(Protocol):
    """Where :meth:`Subscriber.push` hands a message while the stream's writer is idle."""

    def deliver(self, message: Message) -> bool:
        """Write ``message`` now (or drop it as already delivered) and return True; return
        False to have it queued for the writer instead."""

    def heartbeat(self) -> bool:
        """Write a heartbeat now and return True; False: the writer must be asked instead."""


class Subscriber:
    """Per-stream state shared by the hub (producer), the ticker and the stream's writer."""

    __slots__ = (
        "_buffer",
        "_loop",
        "_waiter",
        "aborted",
        "channel",
        "close_reason",
        "cursor",
        "expires_at",
        "floor",
        "heartbeat_after",
        "heartbeat_due",
        "last_write",
        "limit",
        "on_overflow",
        "opened_at",
        "resync",
        "sink",
        "task",
        "user_id",
        "writing_since",
    )

    def __init__(
        self,
        channel: str,
        user_id: str,
        limit: int,
        expires_at: float,
        on_overflow: Callable[[], object] | None = None,
    ) -> None:
        self.channel = channel
        self.user_id = user_id
        self.limit = limit
        #: Called once when the buffer overflows, the moment the stream is told to close (its
        #: writer may stay blocked on the client for a while before the stream ends).
        self.on_overflow = on_overflow
        #: Wall-clock time (epoch seconds) at which the stream closes with ``token-expired``.
        self.expires_at = expires_at
        self._buffer: list[Message] = []
        self._waiter: asyncio.Future[None] | None = None
        #: Cached: ``asyncio.get_running_loop()`` costs a ``getpid()`` system call every time.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Lent by the writer while it is idle and in sync (see the module docstring).
        self.sink: Sink | None = None
        self.close_reason: CloseReason | None = None
        #: The stream must (re)read the log before writing live messages: set at open and after
        #: the hub resubscribed following a Redis outage (PROTOCOL §5).
        self.resync = True
        self.heartbeat_due = False
        #: Idle seconds after which the ticker writes a heartbeat (set by the registry).
        self.heartbeat_after = math.inf
        #: Highest log id read by the last resync: live messages at or below it are duplicates.
        self.floor: StreamId | None = None
        #: Highest id delivered (or reflected by a snapshot): where a resync resumes.
        self.cursor: StreamId | None = None
        now = time.monotonic()
        self.opened_at = now
        self.last_write = now
        #: Monotonic time the writer entered ``send`` and has not returned, else ``None``.
        self.writing_since: float | None = None
        self.task: asyncio.Task[object] | None = None
        self.aborted = False

    # --- producer side (hub, ticker): never blocks ----------------------------------------------

    def push(self, message: Message) -> None:
        """Queue ``message``; a full buffer closes the stream as a slow consumer instead."""
        if self.close_reason is not None:
            return
        sink = self.sink
        if sink is not None:
            if sink.deliver(message):
                return
            self.sink = None  # from now on in order through the buffer, until the writer is idle
        self.hold(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def hold(self, message: Message) -> None:
        """Queue ``message`` without waking the writer (the sink holds it for a later write)."""
        buffer = self._buffer
        if len(buffer) >= self.limit:
            if self.close_reason is None and self.on_overflow is not None:
                self.on_overflow()
            self.close("slow-consumer")
            return
        buffer.append(message)

    def close(self, reason: CloseReason) -> None:
        """Ask the writer to end the stream with ``reason`` (the first reason wins)."""
        if self.close_reason is None:
            self.close_reason = reason
        self.wake()

    def request_resync(self) -> None:
        self.resync = True
        self.wake()

    def request_heartbeat(self) -> None:
        self.heartbeat_due = True
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- consumer side (the stream's writer) ---------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def drain(self) -> list[Message]:
        """Everything buffered, oldest first; the buffer is empty afterwards."""
        batch = self._buffer
        self._buffer = []
        return batch

    def has_work(self, *, include_buffer: bool = True) -> bool:
        return bool(
            (include_buffer and self._buffer)
            or self.close_reason is not None
            or self.resync
            or self.heartbeat_due
        )

    async def wait(self, seconds: float | None = None, *, include_buffer: bool = True) -> None:
        """Sleep until there is something to do (or ``seconds`` pass).

        ``include_buffer=False`` is for a writer that may not deliver live messages yet (its log
        read is pending): buffered messages then do not count as work, though a new one still
        wakes it once.
        """
        if self.has_work(include_buffer=include_buffer):
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        try:
            if seconds is None:
                await waiter
            else:
                try:
                    async with asyncio.timeout(seconds):
                        await waiter
                except TimeoutError:
                    pass
        finally:
            self._waiter = None
