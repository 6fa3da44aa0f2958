"""One open stream's state: its bounded buffer, cursor and close reason (STYLE §6).

The hub calls :meth:`Subscriber.push` from its single reader task; it never blocks and never
allocates per message beyond a list slot: the :class:`Message` (already framed as SSE bytes) is
shared by every subscriber of the channel. A full buffer closes this stream only, with
``slow-consumer`` (SPEC §5); the client resumes with ``Last-Event-ID``.

The stream's writer (``streams.py``) sleeps in :meth:`wait` and, when woken, takes *everything*
buffered with :meth:`drain` and writes it in one ``send``: under load that batches many events into
one syscall instead of waking once per event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Literal, TypeAlias

from rapidphoto_contract.stream_ids import StreamId

#: Why a stream ends. The first five are sent to the client as ``STREAM_CLOSED`` reasons (SPEC §5);
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
    stream closes (SPEC §5); ``occurred_at`` is the publisher's clock (epoch seconds) for the lag
    histogram, observed once per message and process (``observed``).
    """

    __slots__ = ("frame", "observed", "occurred_at", "stream_id", "terminal")

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


class Subscriber:
    """Per-stream state shared by the hub (producer), the ticker and the stream's writer."""

    __slots__ = (
        "_buffer",
        "_waiter",
        "aborted",
        "channel",
        "close_reason",
        "cursor",
        "expires_at",
        "floor",
        "heartbeat_due",
        "last_write",
        "limit",
        "opened_at",
        "resync",
        "task",
        "user_id",
        "writing_since",
    )

    def __init__(self, channel: str, user_id: str, limit: int, expires_at: float) -> None:
        self.channel = channel
        self.user_id = user_id
        self.limit = limit
        #: Wall-clock time (epoch seconds) at which the stream closes with ``token-expired``.
        self.expires_at = expires_at
        self._buffer: list[Message] = []
        self._waiter: asyncio.Future[None] | None = None
        self.close_reason: CloseReason | None = None
        #: The stream must (re)read the log before writing live messages: set at open and after
        #: the hub resubscribed following a Redis outage (SPEC §5).
        self.resync = True
        self.heartbeat_due = False
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
        buffer = self._buffer
        if len(buffer) >= self.limit:
            self.close("slow-consumer")
            return
        buffer.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        waiter = asyncio.get_running_loop().create_future()
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
