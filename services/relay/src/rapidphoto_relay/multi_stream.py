"""The HTTP side of a multi-session stream (PROTOCOL §5.1): :class:`MultiEventStream`.

Its life is a single stream's (``event_stream.py``: headers, ``retry:``, reads, live messages,
``STREAM_CLOSED``), with one difference: a *read* is of every lane that needs one, in one round
trip (``LogReader.sync_sessions``), and writes, in the order the sessions were asked for, each
session's snapshot or replay, a ``SESSION_CLOSED`` for each session that never appeared (or
appeared with another owner), then the notifications' replay.

Lanes that need a read: all of them at open; the lanes whose channel the hub resubscribed after an
outage; and the pending ones (sessions that do not exist yet), which a poller task makes the stream
look for every ``PENDING_POLL_SECONDS`` (and whenever their channel speaks) until they appear or
their ``PENDING_SESSION_SECONDS`` pass. While a read runs, live messages wait in the buffer; the
others' delays are one round trip, so a pending session never holds up the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from litestar.types import Send
from redis.exceptions import RedisError

from rapidphoto_contract.stream_ids import StreamId
from rapidphoto_relay.event_stream import (
    PENDING_POLL_SECONDS,
    RESYNC_RETRY_SECONDS,
    EventStream,
)
from rapidphoto_relay.multi_writer import Lane, MultiStreamWriter
from rapidphoto_relay.services import RelayServices

log = logging.getLogger("rapidphoto_relay.streams")

#: The cursor position of a snapshot of an empty log: a resume reads the whole log.
LOG_START: Final[StreamId] = (0, 0)


class MultiEventStream(EventStream):
    """The ASGI app of one multi-session stream (see the module docstring)."""

    __slots__ = ("_poller",)

    writer: MultiStreamWriter

    def __init__(
        self, services: RelayServices, writer: MultiStreamWriter, *, resumed_from: str | None
    ) -> None:
        super().__init__(
            services,
            writer,
            kind="multi",
            key=writer.user_id,
            pending=False,
            resumed_from=resumed_from,
        )
        self._poller: asyncio.Task[None] | None = None

    async def _resync(self, send: Send) -> None:
        writer = self.writer
        writer.resync = False
        writer.in_sync = False
        while writer.close_reason is None:
            try:
                frames = await self._read()
                break
            except RedisError as exc:
                # PROTOCOL §5: with Redis away the stream stays open on heartbeats and catches up.
                log.warning(
                    "log read failed, will retry",
                    extra={"channel": writer.channel, "error": str(exc)},
                )
                await writer.idle(send, RESYNC_RETRY_SECONDS)
                writer.resync = False
        else:
            return
        if frames:
            await writer.write(send, b"".join(frames))
        writer.in_sync = True
        if writer.all_done:
            writer.close("completed")
        elif self._poller is None and writer.pending_lanes():
            self._poller = asyncio.create_task(self._poll_pending())

    async def _read(self) -> list[bytes]:
        """Read every lane that needs it; the frames to write, in the order of the lanes."""
        writer = self.writer
        reader = self.services.reader
        sessions = [
            lane
            for lane in writer.lanes
            if lane.kind == "session" and not lane.closed and (lane.stale or lane.pending)
        ]
        notifications = writer.notifications
        if notifications is not None and not notifications.stale:
            notifications = None
        results = (
            await reader.sync_sessions([(lane.key, lane.position) for lane in sessions])
            if sessions
            else []
        )
        entries = (
            await reader.notifications_after(writer.user_id, notifications.position)
            if notifications is not None
            else []
        )
        # Everything read: from here on nothing awaits, so the lanes change all at once.
        now = time.monotonic()
        frames: list[bytes] = []
        replays = self.services.metrics.replays
        for lane, result in zip(sessions, results, strict=True):
            lane.stale = False
            if result.outcome == "missing":
                if not lane.pending or now >= lane.deadline:
                    # Never appeared; or gone with a Redis that lost its data (PROTOCOL §5).
                    frames.append(writer.closed_frame(lane, "session-not-found"))
                continue
            if result.owner != writer.user_id:
                frames.append(writer.closed_frame(lane, "forbidden"))
                continue
            replays.labels(result.outcome).inc()
            lane.pending = False
            lane.floor = result.high
            if result.outcome == "snapshot":
                snapshot = result.messages[0]
                frames.append(writer.snapshot_frame(lane, snapshot, result.high or LOG_START))
            else:
                frames.extend(writer.framed(lane, message) for message in result.messages)
            lane.completed = result.completed
            lane.live = True
        if notifications is not None:
            notifications.stale = False
            replays.labels("replay" if entries else "live").inc()
            frames.extend(writer.framed(notifications, message) for message in entries)
            notifications.floor = notifications.position
            notifications.live = True
        return frames

    async def _poll_pending(self) -> None:
        """Make the stream look for its pending sessions until none is left."""
        writer = self.writer
        while writer.close_reason is None and writer.pending_lanes():
            await asyncio.sleep(PENDING_POLL_SECONDS)
            writer.request_resync()
        self._poller = None

    def _unsubscribe(self) -> None:
        poller = self._poller
        if poller is not None:
            poller.cancel()
        hub = self.services.hub
        for lane in self.writer.lanes:
            hub.unsubscribe(lane.channel, lane)


async def subscribe_lanes(services: RelayServices, lanes: list[Lane], within: float) -> None:
    """Subscribe every lane, concurrently; on any failure none stays subscribed."""
    hub = services.hub
    outcomes = await asyncio.gather(
        *(hub.subscribe(lane.channel, lane, within) for lane in lanes), return_exceptions=True
    )
    failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failure is not None:
        for lane in lanes:
            with contextlib.suppress(Exception):
                hub.unsubscribe(lane.channel, lane)
        raise failure
