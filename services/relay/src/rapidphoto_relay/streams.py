"""The SSE endpoints of PROTOCOL §5 and §5.1: auth (guard) → id check → ownership → limits → stream.

A handler does the checks that can still become an HTTP error (400, 403, 204, 429, 503), admits the
stream (connection limits, a confirmed subscription of its :class:`StreamWriter`) and returns
:class:`StreamResponse`, whose ASGI app, :class:`~rapidphoto_relay.event_stream.EventStream`, then
owns the connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Final, TypeAlias, TypedDict

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIType, Schema
from litestar.params import HeaderParameter, KwargDefinition, PathParameter, QueryParameter
from litestar.types import ASGIApp
from redis.exceptions import RedisError

from rapidphoto_contract import keys
from rapidphoto_contract.ids import ID_PATTERN, RESERVED_SESSION_IDS, is_valid_id
from rapidphoto_contract.stream_ids import StreamId, parse_stream_id
from rapidphoto_contract.tokens import Principal
from rapidphoto_relay import cursor
from rapidphoto_relay.auth import SECURITY, authenticated, principal_of
from rapidphoto_relay.errors import (
    BadRequest,
    Forbidden,
    TooManyStreams,
    Unavailable,
    error_response,
)
from rapidphoto_relay.event_stream import PENDING_SESSION_SECONDS, EventStream, StreamKind
from rapidphoto_relay.hub import HubUnavailable
from rapidphoto_relay.limits import LimitExceeded
from rapidphoto_relay.multi_stream import LOG_START, MultiEventStream, subscribe_lanes
from rapidphoto_relay.multi_writer import MultiStreamWriter
from rapidphoto_relay.payload import TYPE_PATTERN
from rapidphoto_relay.services import RelayServices
from rapidphoto_relay.writer import StreamWriter

SESSION_STREAM_PATH: Final = "/api/upload/sessions/{sessionId:str}/stream"
NOTIFICATION_STREAM_PATH: Final = "/api/upload/sessions/notifications/stream"
MULTI_STREAM_PATH: Final = "/api/upload/sessions/stream"
SUBSCRIBE_TIMEOUT_SECONDS: Final = 5.0


class StreamResponse(Response[None]):
    """Hands the connection to an :class:`EventStream` (bypassing Litestar's body encoding)."""

    def __init__(self, stream: EventStream | MultiEventStream) -> None:
        super().__init__(content=None, media_type="text/event-stream")
        self.stream = stream

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        return self.stream


# --- admission -------------------------------------------------------------------------------


def _last_event_id(header_value: str | None, query_value: str | None) -> str | None:
    """PROTOCOL §5: the ``Last-Event-ID`` header, else the ``lastEventId`` query parameter."""
    return header_value or query_value or None


def _acquire(services: RelayServices, principal: Principal) -> None:
    """Count one stream against the limits, or raise 429/503 (PROTOCOL §5)."""
    if services.registry.shutting_down:
        raise Unavailable("relay is shutting down", services.limits.retry_after)
    try:
        services.limits.acquire(principal.user_id)
    except LimitExceeded as exc:
        services.metrics.rejected_streams.labels(exc.limit).inc()
        if exc.limit == "user":
            raise TooManyStreams(str(exc), exc.retry_after) from None
        raise Unavailable(str(exc), exc.retry_after) from None


async def _admit(
    services: RelayServices, principal: Principal, channel: str, kind: StreamKind
) -> StreamWriter:
    """Count the stream against the limits and subscribe it (confirmed) or raise 429/503."""
    _acquire(services, principal)
    writer = StreamWriter(
        channel,
        principal.user_id,
        services.settings.sse_buffer_events,
        principal.expires_at,
        session=kind == "session",
        coalescer=services.coalescer,
        metrics=services.metrics,
    )
    try:
        await services.hub.subscribe(channel, writer, SUBSCRIBE_TIMEOUT_SECONDS)
    except (HubUnavailable, asyncio.CancelledError) as exc:
        services.limits.release(principal.user_id)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise Unavailable(
            "event source unavailable, retry later", services.limits.retry_after
        ) from None
    services.registry.add(writer)
    services.metrics.open_streams.labels(kind).inc()
    return writer


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


class MultiStreamEvent(_EventFields, total=False):
    """One event of a multi-session stream (PROTOCOL §5.1): its ``id:`` is the stream's cursor."""

    #: The cursor after this frame (opaque): the ``Last-Event-ID`` to resume after it.
    id: Annotated[
        str,
        KwargDefinition(pattern=r"^m1(\.[A-Za-z0-9_-]{1,8}~([0-9]{1,20}-[0-9]{1,20}|x))*$"),
    ]


_MULTI_EVENTS: Final = ResponseSpec(
    MultiStreamEvent,
    description="the stream: text/event-stream, one schema per event",
    media_type="text/event-stream",
    generate_examples=False,
)

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
        raise Unavailable(
            "event source unavailable, retry later", services.limits.retry_after
        ) from None
    if probe.owner is not None and probe.owner != principal.user_id:
        raise Forbidden("this session belongs to another user")
    if probe.completed and resume_from is not None and resume_from == probe.newest:
        # PROTOCOL §5: already at the end of a completed session; 204 makes EventSource stop retrying.
        return Response(content=None, status_code=204)
    writer = await _admit(services, principal, keys.session_channel(session_id), "session")
    writer.cursor = resume_from
    return StreamResponse(
        EventStream(
            services,
            writer,
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
        raise Unavailable(
            "event source unavailable, retry later", services.limits.retry_after
        ) from None
    if resume_from is None or newest is None or resume_from > newest:
        resume_from = newest  # none, malformed or from the future: start live
    writer = await _admit(
        services, principal, keys.notification_channel(principal.user_id), "notifications"
    )
    writer.cursor = resume_from
    return StreamResponse(
        EventStream(
            services,
            writer,
            kind="notifications",
            key=principal.user_id,
            pending=False,
            resumed_from=raw_last,
        )
    )


# --- PROTOCOL §5.1: one stream for several sessions -----------------------------------------

#: ``?session=``: the sessions to carry, repeated; a repeated id counts once.
SessionsQuery: TypeAlias = Annotated[
    list[str] | None,
    QueryParameter(
        name="session",
        required=False,
        description=(
            "a session to carry (repeat the parameter for each; a repeated id counts once; "
            "at most RELAY_MAX_SESSIONS_PER_STREAM distinct ones, 32 by default). At least one "
            "session or notifications=1 (a rule this document cannot express: 400 otherwise)"
        ),
        schema_extra={
            "items": Schema(
                type=OpenAPIType.STRING,
                pattern=f"^{ID_PATTERN.pattern}$",
                min_length=1,
                max_length=128,
            ),
            "max_items": 32,
        },
    ),
]

#: ``?notifications=``: ``1`` to carry the caller's notifications too.
NotificationsQuery: TypeAlias = Annotated[
    str | None,
    QueryParameter(
        name="notifications",
        required=False,
        description="1: carry the caller's notifications too; 0 (the default): do not",
        schema_extra={"enum": ["0", "1"]},
    ),
]


def _multi_request(
    sessions: list[str] | None, notifications: str | None, max_sessions: int
) -> tuple[list[str], bool]:
    """The distinct sessions asked for, in order, and whether notifications are; or 400."""
    if notifications not in (None, "0", "1"):
        raise BadRequest("notifications must be 1 or 0")
    wanted = list(dict.fromkeys(sessions or ()))
    for session_id in wanted:
        if not is_valid_id(session_id) or session_id in RESERVED_SESSION_IDS:
            raise BadRequest("every session must match ^[A-Za-z0-9_-]{1,128}$")
    if not wanted and notifications != "1":
        raise BadRequest("ask for at least one session or notifications=1")
    if len(wanted) > max_sessions:
        raise BadRequest(f"at most {max_sessions} sessions per stream")
    return wanted, notifications == "1"


@get(
    MULTI_STREAM_PATH,
    guards=[authenticated],
    media_type="text/event-stream",
    summary="Live progress of several upload sessions, and notifications, on one stream (SSE)",
    description=(
        "For each session in the order asked, its SESSION_SNAPSHOT or the events after the "
        "cursor, then the notifications' replay, then live events. The id: of each frame is a "
        "cursor for the whole stream; send it back as Last-Event-ID. SESSION_CLOSED drops a "
        "session that never appeared. 204 when resuming with everything completed or closed."
    ),
    responses={
        **_ERRORS,
        400: error_response("bad session list or notifications value"),
        403: error_response("a session has another owner"),
        200: _MULTI_EVENTS,
        204: ResponseSpec(None, description="every session completed or closed, stop retrying"),
    },
    security=SECURITY,
    tags=["streams"],
)
async def multi_session_stream(
    request: Request[Any, Any, Any],
    services: NamedDependency[RelayServices],
    sessions: SessionsQuery = None,
    notifications: NotificationsQuery = None,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response[None]:
    principal = principal_of(request)
    wanted, with_notifications = _multi_request(
        sessions, notifications, services.settings.relay_max_sessions_per_stream
    )
    raw_last = _last_event_id(last_event_id_header, last_event_id)
    parsed = cursor.parse_cursor(raw_last)  # malformed: None, every session starts over
    reader = services.reader
    try:
        probes = await reader.probe_sessions(wanted) if wanted else []
        newest_notification = (
            await reader.newest_notification(principal.user_id) if with_notifications else None
        )
    except RedisError:
        raise Unavailable(
            "event source unavailable, retry later", services.limits.retry_after
        ) from None
    if any(p.owner is not None and p.owner != principal.user_id for p in probes):
        raise Forbidden("a session belongs to another user")

    tags = [cursor.session_tag(session_id) for session_id in wanted]
    ambiguous = cursor.colliding(tags)
    resume: list[tuple[bool, StreamId | None]] = [
        parsed.lookup(tag) if parsed is not None and tag not in ambiguous else (False, None)
        for tag in tags
    ]
    if not with_notifications and all(
        (present and position is None)  # closed
        or (present and probe.completed and position == probe.newest)
        for (present, position), probe in zip(resume, probes, strict=True)
    ):
        # PROTOCOL §5.1: at the end of every completed session, the others closed.
        return Response(content=None, status_code=204)

    _acquire(services, principal)
    writer = MultiStreamWriter(
        f"sessions:{len(wanted)}",
        principal.user_id,
        services.settings.sse_buffer_events,
        principal.expires_at,
        coalescer=services.coalescer,
        metrics=services.metrics,
    )
    deadline = time.monotonic() + PENDING_SESSION_SECONDS
    for session_id, tag, (present, position), probe in zip(
        wanted, tags, resume, probes, strict=True
    ):
        lane = writer.add_lane("session", session_id, keys.session_channel(session_id), tag)
        if present and position is None:
            lane.close()  # closed on an earlier connection: stays closed, no second wait
            continue
        if present and position is not None:
            lane.move_to(position)
        if probe.owner is None:
            lane.pending = True
            lane.deadline = deadline
    if with_notifications:
        present, position = (
            parsed.lookup(cursor.NOTIFICATIONS_TAG) if parsed is not None else (False, None)
        )
        if not present or position is None or newest_notification is None:
            position = newest_notification  # none or malformed: start live
        elif position > newest_notification:
            position = newest_notification  # from the future: start live
        lane = writer.add_lane(
            "notifications",
            principal.user_id,
            keys.notification_channel(principal.user_id),
            cursor.NOTIFICATIONS_TAG,
        )
        lane.move_to(position or LOG_START)

    try:
        await subscribe_lanes(
            services, [lane for lane in writer.lanes if not lane.closed], SUBSCRIBE_TIMEOUT_SECONDS
        )
    except (HubUnavailable, asyncio.CancelledError) as exc:
        services.limits.release(principal.user_id)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise Unavailable(
            "event source unavailable, retry later", services.limits.retry_after
        ) from None
    services.registry.add(writer)
    services.metrics.open_streams.labels("multi").inc()
    return StreamResponse(MultiEventStream(services, writer, resumed_from=raw_last))
