"""The two SSE endpoints of PROTOCOL §5: auth (guard) → id check → ownership → limits → stream.

A handler does the checks that can still become an HTTP error (400, 403, 204, 429, 503), admits the
stream (connection limits, a confirmed subscription) and returns :class:`StreamResponse`, whose ASGI
app, :class:`EventStream`, then owns the connection. That writer is deliberately not Litestar's SSE
machinery: frames arrive pre-encoded from the hub (one ``bytes`` object shared by every stream) and
each wake-up writes everything buffered in a single ``send``. While the writer is idle and in sync,
it is also the subscriber's sink (:meth:`EventStream.deliver`): the hub's push then writes the frame
to the connection directly (``direct.py``), with no wake-up at all.

A stream's life: status and headers, ``retry:`` alone, then (session streams whose session does not
exist yet) up to ``PENDING_SESSION_SECONDS`` of waiting, then a log read (``replay.py``), then live
messages, interleaved with a new log read whenever the hub reconnected after a Redis outage. It ends
with ``STREAM_CLOSED`` and a reason, or silently when the client went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, Final, Literal, TypeAlias, TypedDict

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIType, Schema
from litestar.params import HeaderParameter, KwargDefinition, PathParameter, QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send
from redis.exceptions import RedisError

from rapidphoto_contract import keys
from rapidphoto_contract.events import StreamClosed
from rapidphoto_contract.ids import ID_PATTERN, RESERVED_SESSION_IDS, is_valid_id
from rapidphoto_contract.stream_ids import StreamId, format_stream_id, parse_stream_id
from rapidphoto_contract.tokens import Principal
from rapidphoto_relay import sse
from rapidphoto_relay.auth import SECURITY, authenticated, principal_of
from rapidphoto_relay.direct import WRITE_INTERVAL_SECONDS, DirectWriter, encode_chunk
from rapidphoto_relay.errors import (
    BadRequest,
    Forbidden,
    TooManyStreams,
    Unavailable,
    error_response,
)
from rapidphoto_relay.hub import HubUnavailable
from rapidphoto_relay.limits import LimitExceeded
from rapidphoto_relay.payload import TYPE_PATTERN
from rapidphoto_relay.services import RelayServices
from rapidphoto_relay.subscriber import DISCONNECTED, Message, Subscriber

log = logging.getLogger("rapidphoto_relay.streams")

SESSION_STREAM_PATH: Final = "/api/upload/sessions/{sessionId:str}/stream"
NOTIFICATION_STREAM_PATH: Final = "/api/upload/sessions/notifications/stream"
#: PROTOCOL §5: a session that does not exist yet is waited for this long.
PENDING_SESSION_SECONDS: Final = 10.0
#: How often a pending stream looks for its session (it also looks whenever its channel speaks).
PENDING_POLL_SECONDS: Final = 0.25
#: While Redis is unreachable, a stream retries its log read this often (on heartbeats meanwhile).
RESYNC_RETRY_SECONDS: Final = 1.0
SUBSCRIBE_TIMEOUT_SECONDS: Final = 5.0
#: At most this many frames are held for one coalesced write (``direct.py``).
MAX_HELD_FRAMES: Final = 32
#: Close reasons after which what is already buffered is still delivered before STREAM_CLOSED.
_FLUSH_ON_CLOSE: Final = frozenset({"slow-consumer", "shutdown"})

StreamKind = Literal["session", "notifications"]

_HEARTBEAT_CHUNK: Final = encode_chunk(sse.HEARTBEAT)
_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses by default, which would hold events back.
    (b"x-accel-buffering", b"no"),
)


async def _watch_disconnect(receive: Receive, sub: Subscriber) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close(DISCONNECTED)
            return


class EventStream:
    """The ASGI app of one open stream (see the module docstring for its life)."""

    # One per open stream: slots instead of a per-instance dict.
    __slots__ = (
        "_hold_limit",
        "direct",
        "held",
        "in_sync",
        "key",
        "kind",
        "pending",
        "resumed_from",
        "services",
        "sub",
    )

    def __init__(
        self,
        services: RelayServices,
        sub: Subscriber,
        *,
        kind: StreamKind,
        key: str,
        pending: bool,
        resumed_from: str | None,
    ) -> None:
        self.services = services
        self.sub = sub
        self.kind: StreamKind = kind
        #: The session id or, for notification streams, the user id.
        self.key = key
        self.pending = pending
        self.resumed_from = resumed_from
        #: Live messages may be written only after a successful log read (else a gap).
        self.in_sync = False
        #: The server's connection, when live frames can be written to it directly.
        self.direct: DirectWriter | None = None
        #: Frames are held in the buffer for the coalescer's next flush (``direct.py``).
        self.held = False
        #: Held frames are written at once from this many: well below the slow-consumer limit.
        self._hold_limit = max(1, min(MAX_HELD_FRAMES, sub.limit // 2))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub
        task = asyncio.current_task()
        sub.task = task
        watcher = asyncio.create_task(_watch_disconnect(receive, sub))
        log.info(
            "stream opened",
            extra={
                "user": sub.user_id,
                "channel": sub.channel,
                "kind": self.kind,
                # client-supplied: bounded, so a huge header cannot bloat the log
                "last_event_id": None if self.resumed_from is None else self.resumed_from[:64],
                "pending": self.pending,
            },
        )
        try:
            # A fresh list: middleware (CORS) appends to the message's headers in place.
            await send({"type": "http.response.start", "status": 200, "headers": list(_HEADERS)})
            self.direct = DirectWriter.attach(scope)
            await self._write(send, sse.retry(self.services.settings.sse_retry_ms))
            if not self.pending or await self._await_session(send):
                await self._pump(send)
            await self._finish(send)
        except asyncio.CancelledError:
            if not sub.aborted or task is None:
                raise
            # Aborted by the registry: the client stopped reading. Returning without completing
            # the response makes the server close the connection.
            task.uncancel()
        finally:
            watcher.cancel()
            self._release()

    # --- writing -------------------------------------------------------------------------------

    async def _write(self, send: Send, body: bytes, more: bool = True) -> None:
        sub = self.sub
        sub.writing_since = time.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": more})
        sub.writing_since = None
        sub.last_write = time.monotonic()

    async def _idle(self, send: Send, seconds: float) -> None:
        """Wait up to ``seconds`` without delivering live messages, keeping heartbeats going."""
        sub = self.sub
        deadline = time.monotonic() + seconds
        while sub.close_reason is None:
            if sub.heartbeat_due:
                sub.heartbeat_due = False
                await self._write(send, sse.HEARTBEAT)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or sub.resync:
                return
            await sub.wait(remaining, include_buffer=False)

    def _frames(self, batch: list[Message]) -> tuple[list[bytes], bool]:
        """The frames of ``batch`` not already covered by the last log read; and completion."""
        sub = self.sub
        floor = sub.floor
        frames: list[bytes] = []
        for message in batch:
            sid = message.stream_id
            if sid is not None:
                if floor is not None and sid <= floor:
                    continue  # already written by the log read (subscribe-then-read overlap)
                sub.cursor = sid
            frames.append(message.frame)
            if not message.observed:
                self._observe(message)
            if message.terminal and self.kind == "session":
                return frames, True
        return frames, False

    def _observe(self, message: Message) -> None:
        """The publish-to-write lag, once per message and process (at its first write)."""
        message.observed = True
        assert message.occurred_at is not None
        lag = max(0.0, time.time() - message.occurred_at)
        self.services.metrics.delivery_lag.observe(lag)

    def deliver(self, message: Message) -> bool:
        """The subscriber's sink while this writer is idle and in sync: called by the hub.

        Applies the rules of :meth:`_frames` to one message and writes it straight to the
        connection, or holds it for the coalescer when the last write was less than
        ``WRITE_INTERVAL_SECONDS`` ago. Returns False (the message is then queued and this writer
        woken) when the write would block, and for the message that completes a session stream,
        which the writer handles.
        """
        sub = self.sub
        if sub.buffered:  # frames already held for the next flush: this one joins them, in order
            sub.hold(message)
            if sub.buffered >= self._hold_limit:
                self.flush()  # holding must never make a fast client look slow
            return True
        sid = message.stream_id
        if sid is not None:
            floor = sub.floor
            if floor is not None and sid <= floor:
                return True  # already written by the log read
        if message.terminal and self.kind == "session":
            return False
        now = time.monotonic()
        if now - sub.last_write < WRITE_INTERVAL_SECONDS and self._hold_limit > 1:
            sub.hold(message)
            if not self.held:
                self.held = True
                self.services.coalescer.hold(self, sub.last_write + WRITE_INTERVAL_SECONDS)
            return True
        chunk = message.chunk
        if chunk is None:
            chunk = message.chunk = encode_chunk(message.frame)
        direct = self.direct
        if direct is None or not direct.write(chunk):
            return False
        if sid is not None:
            sub.cursor = sid
        sub.last_write = now
        if not message.observed:
            self._observe(message)
        return True

    def heartbeat(self) -> bool:
        """The ticker's call while this writer is idle: the heartbeat, straight to the connection
        (False when it cannot go now: the writer is asked instead). Frames held for the
        coalescer are written first, so a heartbeat never overtakes an event."""
        direct = self.direct
        if direct is None or not direct.writable():
            return False
        if self.sub.buffered:
            self.flush()
            return True  # the stream was just written to: no heartbeat needed
        direct.write(_HEARTBEAT_CHUNK)
        self.sub.last_write = time.monotonic()
        return True

    def flush(self) -> None:
        """The coalescer's call: write everything held since the last write as one chunk."""
        self.held = False
        sub = self.sub
        if sub.sink is not self or not sub.buffered:
            return  # the writer is awake and takes the buffer itself
        direct = self.direct
        if direct is None or not direct.writable():
            sub.sink = None
            sub.wake()  # the writer blocks in send() until the client reads again
            return
        frames, completed = self._frames(sub.drain())
        if frames:
            direct.write(encode_chunk(frames[0] if len(frames) == 1 else b"".join(frames)))
            sub.last_write = time.monotonic()
        if completed:
            sub.close("completed")

    # --- the stream's phases -------------------------------------------------------------------

    async def _await_session(self, send: Send) -> bool:
        """PROTOCOL §5: wait for a session that does not exist yet; False if the stream must end."""
        sub = self.sub
        reader = self.services.reader
        deadline = time.monotonic() + PENDING_SESSION_SECONDS
        while sub.close_reason is None:
            try:
                owner = await reader.session_owner(self.key)
            except RedisError:
                owner = None
            if owner is not None:
                if owner != sub.user_id:
                    sub.close("forbidden")
                    return False
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sub.close("session-not-found")
                return False
            await self._idle(send, min(PENDING_POLL_SECONDS, remaining))
        return False

    async def _pump(self, send: Send) -> None:
        sub = self.sub
        while sub.close_reason is None:
            if sub.resync:
                await self._resync(send)
            elif sub.buffered and self.in_sync:
                frames, completed = self._frames(sub.drain())
                if frames:
                    await self._write(send, frames[0] if len(frames) == 1 else b"".join(frames))
                if completed:
                    sub.close("completed")
            elif sub.heartbeat_due:
                sub.heartbeat_due = False
                await self._write(send, sse.HEARTBEAT)
            elif self.in_sync and self.direct is not None:
                sub.sink = self  # idle and in sync: the hub may write to the connection itself
                try:
                    await sub.wait()
                finally:
                    sub.sink = None
            else:
                await sub.wait(include_buffer=self.in_sync)

    async def _resync(self, send: Send) -> None:
        """Read the log after the cursor (or a snapshot) and write it; retry while Redis is down."""
        sub = self.sub
        sub.resync = False
        self.in_sync = False
        while sub.close_reason is None:
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
                    extra={"channel": sub.channel, "error": str(exc)},
                )
                await self._idle(send, RESYNC_RETRY_SECONDS)
                sub.resync = False
        else:
            return
        if messages:
            body = b"".join(m.frame for m in messages)
            await self._write(send, body)
        self.in_sync = True
        if completed:
            sub.close("completed")

    async def _read_session(self) -> tuple[list[Message], bool]:
        sub = self.sub
        result = await self.services.reader.sync_session(self.key, sub.cursor)
        if result.outcome == "missing":
            sub.close("session-not-found")
            return [], False
        if result.owner != sub.user_id:
            sub.close("forbidden")
            return [], False
        self.services.metrics.replays.labels(result.outcome).inc()
        sub.floor = result.high
        if result.high is not None:
            sub.cursor = result.high
        return result.messages, result.completed

    async def _read_notifications(self) -> list[Message]:
        sub = self.sub
        messages = await self.services.reader.notifications_after(self.key, sub.cursor)
        self.services.metrics.replays.labels("replay" if messages else "live").inc()
        if messages and messages[-1].stream_id is not None:
            sub.cursor = messages[-1].stream_id
        sub.floor = sub.cursor
        return messages

    async def _finish(self, send: Send) -> None:
        sub = self.sub
        reason = sub.close_reason
        if reason is None or reason == DISCONNECTED:
            return  # nobody to tell; the server sees the disconnect
        body = b""
        if reason in _FLUSH_ON_CLOSE and self.in_sync and sub.buffered:
            frames, _ = self._frames(sub.drain())
            body = b"".join(frames)
        closed = StreamClosed(reason=reason)
        body += sse.event(closed.to_json(), event_type=StreamClosed.TYPE)
        await self._write(send, body, more=False)

    def _release(self) -> None:
        """Synchronous on purpose: a cancellation cannot interrupt it half way."""
        services, sub = self.services, self.sub
        services.hub.unsubscribe(sub.channel, sub)
        services.limits.release(sub.user_id)
        services.registry.remove(sub)
        services.metrics.open_streams.labels(self.kind).dec()
        reason = sub.close_reason or DISCONNECTED
        services.metrics.stream_closes.labels(reason).inc()
        log.info(
            "stream closed",
            extra={
                "user": sub.user_id,
                "channel": sub.channel,
                "kind": self.kind,
                "reason": reason,
                "aborted": sub.aborted,
                "duration_s": round(time.monotonic() - sub.opened_at, 3),
                "last_event_id": None if sub.cursor is None else format_stream_id(sub.cursor),
            },
        )


class StreamResponse(Response[None]):
    """Hands the connection to an :class:`EventStream` (bypassing Litestar's body encoding)."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(content=None, media_type="text/event-stream")
        self.stream = stream

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        return self.stream


# --- admission -------------------------------------------------------------------------------


def _retry_after(services: RelayServices) -> int:
    return max(1, -(-services.settings.sse_retry_ms // 1000))


def _last_event_id(header_value: str | None, query_value: str | None) -> str | None:
    """PROTOCOL §5: the ``Last-Event-ID`` header, else the ``lastEventId`` query parameter."""
    return header_value or query_value or None


async def _admit(
    services: RelayServices, principal: Principal, channel: str, kind: StreamKind
) -> Subscriber:
    """Count the stream against the limits and subscribe it (confirmed) or raise 429/503."""
    if services.registry.shutting_down:
        raise Unavailable("relay is shutting down", _retry_after(services))
    try:
        services.limits.acquire(principal.user_id)
    except LimitExceeded as exc:
        services.metrics.rejected_streams.labels(exc.limit).inc()
        if exc.limit == "user":
            raise TooManyStreams(str(exc), exc.retry_after) from None
        raise Unavailable(str(exc), exc.retry_after) from None
    sub = Subscriber(
        channel,
        principal.user_id,
        services.settings.sse_buffer_events,
        principal.expires_at,
        on_overflow=services.metrics.count_slow_consumer,
    )
    try:
        await services.hub.subscribe(channel, sub, SUBSCRIBE_TIMEOUT_SECONDS)
    except (HubUnavailable, asyncio.CancelledError) as exc:
        services.limits.release(principal.user_id)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise Unavailable("event source unavailable, retry later", _retry_after(services)) from None
    services.registry.add(sub)
    services.metrics.open_streams.labels(kind).inc()
    return sub


_ERRORS: Final = {
    400: error_response("sessionId is not an id"),
    401: error_response("missing or invalid token"),
    403: error_response("the session has another owner"),
    429: error_response("too many streams for this user"),
    503: error_response("relay full or Redis unavailable"),
}


class _EventFields(TypedDict):
    #: The payload's ``type``.
    event: Annotated[str, KwargDefinition(pattern=f"^{TYPE_PATTERN.pattern}$")]
    #: The payload: a JSON object with a string ``type``.
    data: Annotated[
        str,
        KwargDefinition(
            schema_extra={
                "content_media_type": MediaType.JSON.value,
                "content_schema": Schema(
                    type=OpenAPIType.OBJECT,
                    required=["type"],
                    properties={
                        "type": Schema(type=OpenAPIType.STRING, pattern=f"^{TYPE_PATTERN.pattern}$")
                    },
                ),
            }
        ),
    ]


# (total=False rather than NotRequired: this module's annotations are strings, which TypedDict
# cannot see through, so NotRequired[...] would still be listed as required.)
class StreamEvent(_EventFields, total=False):
    """One event of a stream (PROTOCOL §4, §5), for the OpenAPI document: the ``event:``, ``data:``
    and ``id:`` fields of a frame. (Comment lines and the ``retry:`` frame carry no event.)"""

    #: The payload's log entry id, when it has one: the ``Last-Event-ID`` to resume after it.
    id: Annotated[str, KwargDefinition(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]


_EVENTS: Final = ResponseSpec(
    StreamEvent,
    description="the stream: text/event-stream, one schema per event",
    media_type="text/event-stream",
    generate_examples=False,
)

#: ``{sessionId}``: an id of PROTOCOL §3 (the handler checks it: 400 with the usual error body).
SessionIdPath: TypeAlias = Annotated[
    str,
    PathParameter(
        description="the session's id",
        schema_extra={
            "pattern": f"^{ID_PATTERN.pattern}$",
            "min_length": 1,
            "max_length": 128,
        },
    ),
]

#: ``Last-Event-ID``: the id of the last event received, sent by EventSource when it reconnects.
LastEventIdHeader: TypeAlias = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        required=False,
        description="resume after this event id",
        examples=[Example(value="1764213600000-0")],
    ),
]

#: ``?lastEventId=``: the ``Last-Event-ID`` of clients that cannot send the header.
LastEventIdQuery: TypeAlias = Annotated[
    str | None,
    QueryParameter(
        name="lastEventId",
        required=False,
        description="Last-Event-ID for clients that cannot send the header",
        examples=[Example(value="1764213600000-0")],
    ),
]


@get(
    SESSION_STREAM_PATH,
    guards=[authenticated],
    media_type="text/event-stream",
    summary="Live progress of one upload session (SSE)",
    description=(
        "SESSION_SNAPSHOT then live events; resumes after Last-Event-ID while the log covers it. "
        "204 when resuming at the end of a completed session."
    ),
    responses={
        **_ERRORS,
        200: _EVENTS,
        204: ResponseSpec(None, description="session completed, stop retrying"),
    },
    security=SECURITY,
    tags=["streams"],
)
async def session_stream(
    request: Request[Any, Any, Any],
    sessionId: SessionIdPath,  # the path parameter's public (camelCase) name
    services: NamedDependency[RelayServices],
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response[None]:
    principal = principal_of(request)
    session_id = sessionId
    if not is_valid_id(session_id) or session_id in RESERVED_SESSION_IDS:
        raise BadRequest("sessionId must match ^[A-Za-z0-9_-]{1,128}$")
    raw_last = _last_event_id(last_event_id_header, last_event_id)
    resume_from: StreamId | None = parse_stream_id(raw_last)  # malformed: None, a snapshot
    try:
        probe = await services.reader.probe_session(session_id)
    except RedisError:
        raise Unavailable("event source unavailable, retry later", _retry_after(services)) from None
    if probe.owner is not None and probe.owner != principal.user_id:
        raise Forbidden("this session belongs to another user")
    if probe.completed and resume_from is not None and resume_from == probe.newest:
        # PROTOCOL §5: already at the end of a completed session; 204 makes EventSource stop retrying.
        return Response(content=None, status_code=204)
    sub = await _admit(services, principal, keys.session_channel(session_id), "session")
    sub.cursor = resume_from
    return StreamResponse(
        EventStream(
            services,
            sub,
            kind="session",
            key=session_id,
            pending=probe.owner is None,
            resumed_from=raw_last,
        )
    )


@get(
    NOTIFICATION_STREAM_PATH,
    guards=[authenticated],
    media_type="text/event-stream",
    summary="The caller's notifications (SSE)",
    description=(
        "Live notifications of the token's user; with Last-Event-ID, the ones after it first "
        "(all of the log when the id is older than it)."
    ),
    responses={
        **{k: v for k, v in _ERRORS.items() if k != 403},
        # Litestar documents a 400 for any handler with parameters; ours has the usual body.
        400: error_response("malformed request"),
        200: _EVENTS,
    },
    security=SECURITY,
    tags=["streams"],
)
async def notification_stream(
    request: Request[Any, Any, Any],
    services: NamedDependency[RelayServices],
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response[None]:
    principal = principal_of(request)
    raw_last = _last_event_id(last_event_id_header, last_event_id)
    resume_from = parse_stream_id(raw_last)
    try:
        # Read before subscribing: a stream that starts live replays from here, so notifications
        # racing the subscription are delivered (PROTOCOL §5's no-gap rule, notification edition).
        newest = await services.reader.newest_notification(principal.user_id)
    except RedisError:
        raise Unavailable("event source unavailable, retry later", _retry_after(services)) from None
    if resume_from is None or newest is None or resume_from > newest:
        resume_from = newest  # none, malformed or from the future: start live
    sub = await _admit(
        services, principal, keys.notification_channel(principal.user_id), "notifications"
    )
    sub.cursor = resume_from
    return StreamResponse(
        EventStream(
            services,
            sub,
            kind="notifications",
            key=principal.user_id,
            pending=False,
            resumed_from=raw_last,
        )
    )
