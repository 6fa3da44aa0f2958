"""Writing a multi-session stream (PROTOCOL §5.1): :class:`MultiStreamWriter` and its :class:`Lane`\\ s.

A multi-session stream is one :class:`~rapidphoto_relay.writer.StreamWriter` (one buffer, one task,
one connection: direct writes, coalescing, heartbeats, slow-consumer and closing work as on any
stream) fed by several channels. Each session, and the notifications when asked for, is a
:class:`Lane`: the hub's subscriber for that channel, which tags each message with itself and hands
it to the writer. The hub does nothing more per message than for a single stream.

What differs is the rule of :meth:`MultiStreamWriter._take`, applied per lane: a lane that has not
been read yet (its session is pending, or its first read is still to come) drops live messages (the
log read that makes it live covers them: the worker appends and publishes in one step), a message at
or below the lane's ``floor`` was already written by that read, and every log entry written moves the
lane's position and is framed with the stream's cursor (``cursor.py``) as its ``id:``. The frame is
the hub's shared frame with its ``id:`` line replaced, built once per delivery, the price of a
per-stream ``id:``: the writer keeps the pieces of that line (``id: m1``, each lane's item as bytes)
in one list, so a delivery formats its lane's new item and joins the list with the rest of the
frame (cut from the end of its ``id:`` line once per message and shared by every stream,
``Message.after_id``), one allocation, instead of re-encoding the whole cursor.

The stream completes when every session is completed or closed and the notifications were not asked
for; a completed session's later entries are still delivered (PROTOCOL §5.1).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, Literal

from rapidphoto_contract.events import SessionClosed, SessionCloseReason
from rapidphoto_contract.stream_ids import StreamId
from rapidphoto_relay import cursor, sse
from rapidphoto_relay.payload import Message
from rapidphoto_relay.writer import StreamWriter

if TYPE_CHECKING:
    from rapidphoto_relay.coalescer import Coalescer
    from rapidphoto_relay.metrics import RelayMetrics

LaneKind = Literal["session", "notifications"]

_ID_PREFIX: Final = b"id: "


class Lane:
    """One session (or the notifications) of a multi-session stream: the hub's subscriber for its
    channel, and where the stream stands on it."""

    __slots__ = (
        "channel",
        "closed",
        "completed",
        "deadline",
        "floor",
        "index",
        "key",
        "kind",
        "live",
        "pending",
        "position",
        "prefix",
        "stale",
        "tag",
        "writer",
    )

    def __init__(
        self, writer: MultiStreamWriter, kind: LaneKind, key: str, channel: str, tag: str
    ) -> None:
        self.writer = writer
        self.kind: LaneKind = kind
        #: The session id, or the user id for the notifications.
        self.key = key
        self.channel = channel
        self.tag = tag
        #: Last log id delivered (or reflected by a snapshot): where a read resumes.
        self.position: StreamId | None = None
        #: Highest log id of the last read: live messages at or below it are duplicates.
        self.floor: StreamId | None = None
        #: Read at least once: live messages go through (subject to ``floor``).
        self.live = False
        #: Must be read (again): at open, and after the hub resubscribed its channel.
        self.stale = True
        #: The session does not exist yet; waited for until ``deadline`` (monotonic).
        self.pending = False
        self.deadline = 0.0
        self.completed = False
        #: Closed with ``SESSION_CLOSED``: nothing more is delivered for it.
        self.closed = False
        #: Where this lane's part of the cursor (``.<tag>~<position>``, empty while it has none)
        #: is in the writer's pieces of the ``id:`` line, and that part up to the position.
        self.index = 0
        self.prefix = f".{tag}~".encode()

    # --- the hub's subscriber interface --------------------------------------------------------

    def push(self, message: Message) -> None:
        # Always through the writer, even before this lane's first read: whether a message is
        # delivered is decided when it is taken (``MultiStreamWriter._take``), after any read in
        # progress has finished, so a message published while the read runs is never lost.
        if not self.closed:
            self.writer.push(LaneMessage(message, self))
            if self.pending:
                self.writer.look_for_pending()  # its channel spoke: the session may exist now

    def request_resync(self) -> None:
        self.stale = True
        self.writer.request_resync()

    # --- positions -----------------------------------------------------------------------------

    def move_to(self, position: StreamId) -> None:
        self.position = position
        self.writer.set_item(self.index, self.prefix + b"%d-%d" % position)

    def close(self) -> None:
        self.closed = True
        self.pending = False
        self.live = False
        self.writer.set_item(self.index, self.prefix + cursor.CLOSED.encode())

    @property
    def done(self) -> bool:
        """Nothing the client waits for can come on this lane any more."""
        return self.closed or (self.kind == "session" and self.completed)


class LaneMessage(Message):
    """A hub message as one lane of one stream delivers it: its frame gets that stream's cursor."""

    __slots__ = ("lane", "origin")

    def __init__(self, origin: Message, lane: Lane) -> None:
        # Not Message.__init__: one of these is made per delivery, and its keyword call and
        # ``occurred_at`` handling cost more than the slots (the lag is observed on ``origin``).
        self.frame = origin.frame
        self.stream_id = origin.stream_id
        self.terminal = origin.terminal
        self.occurred_at = None
        self.observed = True
        self.chunk = None
        self.origin = origin
        self.lane = lane


class MultiStreamWriter(StreamWriter):
    """The writer of one multi-session stream (see the module docstring)."""

    __slots__ = ("_cursor", "_pieces", "lanes", "notifications")

    def __init__(
        self,
        label: str,
        user_id: str,
        limit: int,
        expires_at: float,
        *,
        coalescer: Coalescer | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        super().__init__(label, user_id, limit, expires_at, coalescer=coalescer, metrics=metrics)
        #: The sessions, in the order asked for, then the notifications' lane when asked for.
        self.lanes: list[Lane] = []
        self.notifications: Lane | None = None
        self._cursor: bytes | None = None
        #: The ``id:`` line in pieces: ``id: ``, ``m1``, each lane's item (b"" while it has none),
        #: and a last slot where :meth:`framed` puts the rest of the frame for the join.
        self._pieces: list[bytes] = [_ID_PREFIX, cursor.VERSION.encode(), b""]

    def add_lane(self, kind: LaneKind, key: str, channel: str, tag: str) -> Lane:
        lane = Lane(self, kind, key, channel, tag)
        lane.index = len(self._pieces) - 1
        self._pieces.insert(lane.index, b"")
        self.lanes.append(lane)
        if kind == "notifications":
            self.notifications = lane
        return lane

    # --- the cursor ----------------------------------------------------------------------------

    def set_item(self, index: int, item: bytes) -> None:
        """A lane's part of the cursor changed."""
        self._pieces[index] = item
        self._cursor = None

    def cursor_id(self) -> bytes:
        """The stream's cursor now (PROTOCOL §5.1), joined once per change."""
        encoded = self._cursor
        if encoded is None:
            encoded = self._cursor = b"".join(self._pieces[1:-1])
        return encoded

    def framed(self, lane: Lane, message: Message) -> bytes:
        """``message``'s frame as this stream delivers it on ``lane``, moving the lane's position."""
        sid = message.stream_id
        if sid is None:
            return message.frame
        lane.position = sid
        pieces = self._pieces
        pieces[lane.index] = lane.prefix + b"%d-%d" % sid
        self._cursor = None
        # The rest of the frame from the end of its own id: line, cut once per message and
        # shared by every stream, joined after the cursor: one allocation per delivery.
        source = message.origin if isinstance(message, LaneMessage) else message
        pieces[-1] = source.after_id()
        framed = b"".join(pieces)
        pieces[-1] = b""
        return framed

    def snapshot_frame(self, lane: Lane, message: Message, position: StreamId) -> bytes:
        """A snapshot's frame: the cursor records ``position`` (``0-0`` for an empty log)."""
        lane.move_to(position)
        return _ID_PREFIX + self.cursor_id() + message.after_id()

    def closed_frame(self, lane: Lane, reason: SessionCloseReason) -> bytes:
        """``SESSION_CLOSED`` for ``lane``, whose item in the cursor records it as closed."""
        lane.close()
        event = SessionClosed(session_id=lane.key, reason=reason)
        return sse.event(
            event.to_json(), event_type=SessionClosed.TYPE, event_id=self.cursor_id().decode()
        )

    @property
    def all_done(self) -> bool:
        """PROTOCOL §5.1: every session completed or closed, and no notifications asked for."""
        return self.notifications is None and all(lane.done for lane in self.lanes)

    # --- pending sessions ----------------------------------------------------------------------

    def look_for_pending(self) -> None:
        """A pending session's channel spoke: the task should look for it now."""
        self.request_resync()

    def pending_lanes(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.pending]

    # --- the rule (see the module docstring) ----------------------------------------------------

    def _take(self, message: Message) -> bool:
        if not isinstance(message, LaneMessage):
            return super()._take(message)
        lane = message.lane
        if not lane.live or lane.closed:
            return False
        sid = message.stream_id
        if sid is not None:
            floor = lane.floor
            if floor is not None and sid <= floor:
                return False
            message.frame = self.framed(lane, message)
            message.chunk = None
        origin = message.origin
        if not origin.observed:
            origin.observed = True
            if self._metrics is not None and origin.occurred_at is not None:
                self._metrics.delivery_lag.observe(max(0.0, time.time() - origin.occurred_at))
        if message.terminal and lane.kind == "session":
            lane.completed = True
            if self.all_done:
                self.close("completed")
        return True
