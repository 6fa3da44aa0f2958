"""The ASGI app of one open stream, :class:`EventStream`: the HTTP side of a stream's life.

A stream's life: status and headers, ``retry:`` alone, then (session streams whose session does not
exist yet) up to ``PENDING_SESSION_SECONDS`` of waiting, then a log read (``replay.py``), then live
messages, interleaved with a new log read whenever the hub reconnected after a Redis outage. It ends
with ``STREAM_CLOSED`` and a reason, or silently when the client went away.

Everything written goes through the stream's :class:`~rapidphoto_relay.writer.StreamWriter`, which
this app drives: the log reads are here, the buffer, direct writes, coalescing, heartbeats and the
closing frame are the writer's. It is deliberately not Litestar's SSE machinery: frames arrive
pre-encoded from the hub (one ``bytes`` object shared by every stream) and each wake-up writes
everything buffered in a single ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Literal

from litestar.types import Receive, Scope, Send
from redis.exceptions import RedisError

from rapidphoto_contract.stream_ids import format_stream_id
from rapidphoto_relay import sse
from rapidphoto_relay.payload import Message
from rapidphoto_relay.services import RelayServices
from rapidphoto_relay.stream_state import DISCONNECTED
from rapidphoto_relay.writer import StreamWriter

log = logging.getLogger("rapidphoto_relay.streams")

#: PROTOCOL §5: a session that does not exist yet is waited for this long.
PENDING_SESSION_SECONDS: Final = 10.0
#: How often a pending stream looks for its session (it also looks whenever its channel speaks).
PENDING_POLL_SECONDS: Final = 0.25
#: While Redis is unreachable, a stream retries its log read this often (on heartbeats meanwhile).
RESYNC_RETRY_SECONDS: Final = 1.0

StreamKind = Literal["session", "notifications", "multi"]

_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses by default, which would hold events back.
    (b"x-accel-buffering", b"no"),
)


async def _watch_disconnect(receive: Receive, writer: StreamWriter) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            writer.close(DISCONNECTED)
            return


class EventStream:
    """The ASGI app of one open stream (see the module docstring for its life)."""

    # One per open stream: slots instead of a per-instance dict.
    __slots__ = ("key", "kind", "pending", "resumed_from", "services", "writer")

    def __init__(
        self,
        services: RelayServices,
        writer: StreamWriter,
        *,
        kind: StreamKind,
        key: str,
        pending: bool,
        resumed_from: str | None,
    ) -> None:
        self.services = services
        self.writer = writer
        self.kind: StreamKind = kind
        #: The session id or, for notification streams, the user id.
        self.key = key
        self.pending = pending
        self.resumed_from = resumed_from

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = self.writer
        task = asyncio.current_task()
        writer.task = task
        watcher = asyncio.create_task(_watch_disconnect(receive, writer))
        log.info(
            "stream opened",
            extra={
                "user": writer.user_id,
                "channel": writer.channel,
                "kind": self.kind,
                # client-supplied: bounded, so a huge header cannot bloat the log
                "last_event_id": None if self.resumed_from is None else self.resumed_from[:64],
                "pending": self.pending,
            },
        )
        try:
            # A fresh list: middleware (CORS) appends to the message's headers in place.
            await send({"type": "http.response.start", "status": 200, "headers": list(_HEADERS)})
            writer.attach(scope)
            await writer.write(send, sse.retry(self.services.settings.sse_retry_ms))
            if not self.pending or await self._await_session(send):
                while writer.close_reason is None:
                    if writer.resync:
                        await self._resync(send)
                    else:
                        await writer.serve(send)  # until a resync is asked for or the end
            await writer.finish(send)
        except asyncio.CancelledError:
            if not writer.aborted or task is None:
                raise
            # Aborted by the registry: the client stopped reading. Returning without completing
            # the response makes the server close the connection.
            task.uncancel()
        finally:
            watcher.cancel()
            self._release()

    async def _await_session(self, send: Send) -> bool:
        """PROTOCOL §5: wait for a session that does not exist yet; False if the stream must end."""
        writer = self.writer
        reader = self.services.reader
        deadline = time.monotonic() + PENDING_SESSION_SECONDS
        while writer.close_reason is None:
            try:
                owner = await reader.session_owner(self.key)
            except RedisError:
                owner = None
            if owner is not None:
                if owner != writer.user_id:
                    writer.close("forbidden")
                    return False
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                writer.close("session-not-found")
                return False
            await writer.idle(send, min(PENDING_POLL_SECONDS, remaining))
        return False

    async def _resync(self, send: Send) -> None:
        """Read the log after the cursor (or a snapshot) and write it; retry while Redis is down."""
        writer = self.writer
        writer.resync = False
        writer.in_sync = False
        while writer.close_reason is None:
            try:
                if self.kind == "session":
                    messages, completed = await self._read_session()
                else:
                    messages, completed = await self._read_notifications(), False
                break
            except RedisError as exc:
                # PROTOCOL §5: with Redis away the stream stays open on heartbeats and catches up later.
                log.warning(
                    "log read failed, will retry",
                    extra={"channel": writer.channel, "error": str(exc)},
                )
                await writer.idle(send, RESYNC_RETRY_SECONDS)
                writer.resync = False
        else:
            return
        await writer.replayed(send, messages)
        if completed:
            writer.close("completed")

    async def _read_session(self) -> tuple[list[Message], bool]:
        writer = self.writer
        result = await self.services.reader.sync_session(self.key, writer.cursor)
        if result.outcome == "missing":
            writer.close("session-not-found")
            return [], False
        if result.owner != writer.user_id:
            writer.close("forbidden")
            return [], False
        self.services.metrics.replays.labels(result.outcome).inc()
        writer.floor = result.high
        if result.high is not None:
            writer.cursor = result.high
        return result.messages, result.completed

    async def _read_notifications(self) -> list[Message]:
        writer = self.writer
        messages = await self.services.reader.notifications_after(self.key, writer.cursor)
        self.services.metrics.replays.labels("replay" if messages else "live").inc()
        if messages and messages[-1].stream_id is not None:
            writer.cursor = messages[-1].stream_id
        writer.floor = writer.cursor
        return messages

    def _unsubscribe(self) -> None:
        self.services.hub.unsubscribe(self.writer.channel, self.writer)

    def _release(self) -> None:
        """Synchronous on purpose: a cancellation cannot interrupt it half way."""
        services, writer = self.services, self.writer
        self._unsubscribe()
        services.limits.release(writer.user_id)
        services.registry.remove(writer)
        services.metrics.open_streams.labels(self.kind).dec()
        reason = writer.close_reason or DISCONNECTED
        services.metrics.stream_closes.labels(reason).inc()
        log.info(
            "stream closed",
            extra={
                "user": writer.user_id,
                "channel": writer.channel,
                "kind": self.kind,
                "reason": reason,
                "aborted": writer.aborted,
                "duration_s": round(time.monotonic() - writer.opened_at, 3),
                "last_event_id": None if writer.cursor is None else format_stream_id(writer.cursor),
            },
        )
