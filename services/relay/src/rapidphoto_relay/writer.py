"""Writing one stream, in one place: :class:`StreamWriter` (its queue, write delay and flush, as in
Centrifuge's ``writer.go``).

A stream's writer owns:

- **The bounded buffer.** The hub's :meth:`StreamWriter.push` never blocks and allocates nothing per
  message beyond a list slot: the :class:`~rapidphoto_relay.payload.Message`, framed once, is shared
  by every stream of the channel (CONVENTIONS §6). A full buffer closes this stream only, with
  ``slow-consumer`` (PROTOCOL §5); the client resumes with ``Last-Event-ID``.
- **The no-duplicate rule** (:meth:`StreamWriter._take`, the one place it is applied): a live
  message at or below ``floor``, the highest id of the last log read, was already written by that
  read (subscribe-then-read overlap, PROTOCOL §5); ``cursor`` is the highest id written, where the
  next log read resumes.
- **Direct writes.** While the stream's task is idle and in sync (``parked``), ``push`` writes the
  frame straight to the server's connection (``direct.py``): no task wake-up at all. As soon as that
  cannot be done at once the message goes to the buffer and the task is woken, and everything goes
  through the buffer until the task parks again, so the order of frames never changes.
- **Coalescing.** At most one write per ``WRITE_INTERVAL_SECONDS`` while frames come faster: the
  frames held meanwhile are written as one chunk by the process-wide :class:`Coalescer`
  (``coalescer.py``, one timer for all streams).
- **Heartbeats** (:meth:`heartbeat`, the ticker's one call): written to a parked stream's connection
  at once, otherwise by the task through ``send``.
- **Closing**: ``STREAM_CLOSED`` with its reason, after what is buffered for the reasons in
  ``FLUSH_ON_CLOSE`` (:meth:`finish`).

The stream's lifecycle (close reason, resync flag, the task's sleep and wake-up, abort) is its base
class, :class:`~rapidphoto_relay.stream_state.StreamState`: one object per stream all the same.

The stream's task (``event_stream.py``, the HTTP side) drives it: it sleeps in :meth:`wait` and,
when woken, :meth:`serve` writes *everything* buffered in one ``send``; under load that batches many
events into one syscall instead of waking once per event.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Final

from rapidphoto_contract.events import StreamClosed
from rapidphoto_contract.stream_ids import StreamId
from rapidphoto_relay import sse
from rapidphoto_relay.coalescer import Coalescer
from rapidphoto_relay.direct import DirectWriter, encode_chunk
from rapidphoto_relay.payload import Message
from rapidphoto_relay.stream_state import DISCONNECTED, EndReason, StreamState

if TYPE_CHECKING:
    from litestar.types import Scope, Send

    from rapidphoto_relay.metrics import RelayMetrics

#: At most one write per stream per this many seconds while its frames come faster.
WRITE_INTERVAL_SECONDS: Final = 0.025
#: At most this many frames are held for one coalesced write.
MAX_HELD_FRAMES: Final = 32
#: Close reasons after which what is already buffered is still delivered before STREAM_CLOSED.
FLUSH_ON_CLOSE: Final[frozenset[EndReason]] = frozenset({"slow-consumer", "shutdown"})

_HEARTBEAT_CHUNK: Final = encode_chunk(sse.HEARTBEAT)


class StreamWriter(StreamState):
    """One open stream's writing, shared by the hub (producer), the ticker and the stream's task."""

    # One per open stream: slots instead of a per-instance dict.
    __slots__ = (
        "_buffer",
        "_coalescer",
        "_hold_limit",
        "_metrics",
        "cursor",
        "direct",
        "floor",
        "heartbeat_after",
        "heartbeat_due",
        "held",
        "in_sync",
        "last_write",
        "limit",
        "parked",
        "session",
        "writing_since",
    )

    def __init__(
        self,
        channel: str,
        user_id: str,
        limit: int,
        expires_at: float,
        *,
        session: bool = False,
        coalescer: Coalescer | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        super().__init__(channel, user_id, expires_at)
        self.limit = limit
        #: A session stream: it completes (closes) after its terminal message.
        self.session = session
        self._coalescer = coalescer
        self._metrics = metrics
        #: Held frames are written at once from this many: well below the slow-consumer limit.
        #: 1 (nothing is ever held) without a coalescer.
        self._hold_limit = 1 if coalescer is None else max(1, min(MAX_HELD_FRAMES, limit // 2))
        self._buffer: list[Message] = []
        #: Live messages may be written only after a successful log read (else a gap).
        self.in_sync = False
        self.heartbeat_due = False
        #: Idle seconds after which the ticker asks for a heartbeat (set by the registry).
        self.heartbeat_after = math.inf
        #: Highest log id read by the last resync: live messages at or below it are duplicates.
        self.floor: StreamId | None = None
        #: Highest id delivered (or reflected by a snapshot): where a resync resumes.
        self.cursor: StreamId | None = None
        #: The server's connection, when frames can be written to it directly.
        self.direct: DirectWriter | None = None
        #: The task is idle and in sync: ``push`` writes to ``direct`` itself.
        self.parked = False
        #: Frames are held in the buffer for the coalescer's next flush.
        self.held = False
        self.last_write = self.opened_at
        #: Monotonic time the task entered ``send`` and has not returned, else ``None``.
        self.writing_since: float | None = None

    # --- the hub and the ticker: never block ---------------------------------------------------

    def request_resync(self) -> None:
        """The hub resubscribed after an outage: the log must be read again before anything live.

        Unparked at once, not when the task wakes: a live message the hub reads right after the
        confirmation (often in the same batch of replies) would otherwise be written directly and
        move the cursor past the events published during the outage, which the log read then skips
        (found by the Redis fault matrix: one event lost after ``CLIENT KILL TYPE pubsub``).
        """
        self.parked = False
        super().request_resync()

    def push(self, message: Message) -> None:
        """Write ``message`` now if the task is parked, else queue it and wake the task."""
        if self.close_reason is not None:
            return
        if self.parked:
            if self._deliver(message):
                return
            self.parked = False  # from now on in order through the buffer, until the task parks
        self._hold(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _hold(self, message: Message) -> None:
        """Queue ``message``; a full buffer closes the stream as a slow consumer instead."""
        buffer = self._buffer
        if len(buffer) >= self.limit:
            if self.close_reason is None and self._metrics is not None:
                self._metrics.count_slow_consumer()
            self.close("slow-consumer")
            return
        buffer.append(message)

    def _deliver(self, message: Message) -> bool:
        """``push`` for a parked task: write ``message`` to the connection, or hold it for the
        coalescer when the last write was less than ``WRITE_INTERVAL_SECONDS`` ago. False (queue
        it, wake the task) when the write cannot go now, and for the message that completes a
        session stream, which the task handles."""
        buffer = self._buffer
        if buffer:  # frames already held for the next flush: this one joins them, in order
            self._hold(message)
            if len(buffer) >= self._hold_limit:
                self.flush()  # holding must never make a fast client look slow
            return True
        if message.terminal and self.session:
            return False
        now = time.monotonic()
        if now - self.last_write < WRITE_INTERVAL_SECONDS and self._hold_limit > 1:
            buffer.append(message)  # empty, below any limit
            if not self.held and self._coalescer is not None:
                self.held = True
                self._coalescer.hold(self, self.last_write + WRITE_INTERVAL_SECONDS)
            return True
        direct = self.direct
        if direct is None or not direct.writable():
            return False
        if self._take(message):
            chunk = message.chunk
            if chunk is None:
                chunk = message.chunk = encode_chunk(message.frame)
            direct.write(chunk)
            self.last_write = now
        return True

    def flush(self) -> None:
        """The coalescer's call: write everything held since the last write as one chunk."""
        self.held = False
        if not self.parked or not self._buffer:
            return  # the task is awake and takes the buffer itself
        direct = self.direct
        if direct is None or not direct.writable():
            self.parked = False
            self.wake()  # the task blocks in send() until the client reads again
            return
        frames, completed = self._frames(self.drain())
        if frames:
            direct.write(encode_chunk(frames[0] if len(frames) == 1 else b"".join(frames)))
            self.last_write = time.monotonic()
        if completed:
            self.close("completed")

    def heartbeat(self) -> None:
        """The ticker's call once nothing was written for ``heartbeat_after`` seconds.

        A parked task's connection takes it at once, without a wake-up (or, when frames are held
        for the coalescer, those are written instead: a heartbeat never overtakes an event);
        otherwise the task writes it through ``send``.
        """
        if self.parked:
            direct = self.direct
            if direct is not None and direct.writable():
                if self._buffer:
                    self.flush()
                else:
                    direct.write(_HEARTBEAT_CHUNK)
                    self.last_write = time.monotonic()
                return
        self.heartbeat_due = True
        self.wake()

    # --- the rule ------------------------------------------------------------------------------

    def _take(self, message: Message) -> bool:
        """PROTOCOL §5, no duplicates: False for a message the last log read already wrote (at or
        below ``floor``); otherwise it is about to be written and ``cursor`` moves to it."""
        sid = message.stream_id
        if sid is not None:
            floor = self.floor
            if floor is not None and sid <= floor:
                return False
            self.cursor = sid
        if not message.observed:
            # The publish-to-write lag, once per message and process (at its first write).
            message.observed = True
            if self._metrics is not None and message.occurred_at is not None:
                self._metrics.delivery_lag.observe(max(0.0, time.time() - message.occurred_at))
        return True

    def _frames(self, batch: list[Message]) -> tuple[list[bytes], bool]:
        """The frames of ``batch`` to write (see :meth:`_take`); and whether the stream completed."""
        frames: list[bytes] = []
        for message in batch:
            if self._take(message):
                frames.append(message.frame)
                if message.terminal and self.session:
                    return frames, True
        return frames, False

    # --- the stream's task ---------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def drain(self) -> list[Message]:
        """Everything buffered, oldest first; the buffer is empty afterwards."""
        batch = self._buffer
        self._buffer = []
        return batch

    def attach(self, scope: Scope) -> None:
        """After ``http.response.start``: use the server's connection directly if it allows it."""
        self.direct = DirectWriter.attach(scope)

    async def write(self, send: Send, body: bytes, more: bool = True) -> None:
        self.writing_since = time.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": more})
        self.writing_since = None
        self.last_write = time.monotonic()

    async def wait(self, seconds: float | None = None, *, include_buffer: bool = True) -> None:
        """Sleep until there is something to do (or ``seconds`` pass).

        ``include_buffer=False`` is for a task that may not deliver live messages yet (its log read
        is pending): buffered messages then do not count as work, though a new one still wakes it.
        """
        if (
            (include_buffer and self._buffer)
            or self.close_reason is not None
            or self.resync
            or self.heartbeat_due
        ):
            return
        await self._sleep(seconds)

    async def idle(self, send: Send, seconds: float) -> None:
        """Wait up to ``seconds`` without delivering live messages, keeping heartbeats going."""
        deadline = time.monotonic() + seconds
        while self.close_reason is None:
            if self.heartbeat_due:
                self.heartbeat_due = False
                await self.write(send, sse.HEARTBEAT)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.resync:
                return
            await self.wait(remaining, include_buffer=False)

    async def replayed(self, send: Send, messages: list[Message]) -> None:
        """Write what a log read returned (``floor`` and ``cursor`` set): in sync from now on."""
        if messages:
            await self.write(send, b"".join(m.frame for m in messages))
        self.in_sync = True

    async def serve(self, send: Send) -> None:
        """In sync: deliver live messages until a resync is asked for or the stream closes."""
        while self.close_reason is None and not self.resync:
            if self._buffer:
                frames, completed = self._frames(self.drain())
                if frames:
                    await self.write(send, frames[0] if len(frames) == 1 else b"".join(frames))
                if completed:
                    self.close("completed")
            elif self.heartbeat_due:
                self.heartbeat_due = False
                await self.write(send, sse.HEARTBEAT)
            elif self.direct is not None:
                self.parked = True  # idle and in sync: the hub may write to the connection itself
                try:
                    await self.wait()
                finally:
                    self.parked = False
            else:
                await self.wait()

    async def finish(self, send: Send) -> None:
        """End the response: ``STREAM_CLOSED`` and its reason (nothing when the client is gone)."""
        reason = self.close_reason
        if reason is None or reason == DISCONNECTED:
            return  # nobody to tell; the server sees the disconnect
        body = b""
        if reason in FLUSH_ON_CLOSE and self.in_sync and self._buffer:
            frames, _ = self._frames(self.drain())
            body = b"".join(frames)
        closed = StreamClosed(reason=reason)
        body += sse.event(closed.to_json(), event_type=StreamClosed.TYPE)
        await self.write(send, body, more=False)
