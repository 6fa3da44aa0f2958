"""The Python client of the relay's streams (PROTOCOL §5, §5.1): typed events, resumed by itself.

    async with stream(relay_url, token=token, sessions=[session_id]) as events:
        async for event in events:          # contract events (SessionSnapshot, PhotoUploaded, ...)
            ...
    # ends normally once the relay said the sessions are done (STREAM_CLOSED completed, or 204)

One session opens its own stream, no session with ``notifications=True`` the notification stream,
anything else (several sessions, or sessions and notifications) the multi-session stream. What the
client does for the caller, as a browser's EventSource does and more (PROTOCOL §5):

- SSE is parsed by ``httpx-sse`` (the WHATWG rules: ``id:`` kept across frames, ``retry:``);
  payloads are decoded into the contract's event classes, and a type the contract does not know (a
  direct publish by another backend, PROTOCOL §4) comes through as an :class:`OtherEvent`.
- It resumes after a dropped connection, a silent one (nothing, not even a heartbeat, for
  ``idle_timeout``) and ``STREAM_CLOSED`` ``slow-consumer``/``shutdown``, with ``Last-Event-ID`` set
  to the last id the relay sent, so nothing is lost or repeated; it waits the relay's ``retry:``
  first, then backs off (doubling, at most ``max_backoff``) while connections keep failing, and
  waits exactly ``Retry-After`` when a 429/503 says so. Given several relay URLs it goes round them.
- Final answers end it: ``STREAM_CLOSED completed`` and 204 end the iteration normally
  (:attr:`EventStream.close_reason` is ``"completed"``); a refusal (400/401/403/404, another 4xx,
  ``STREAM_CLOSED`` ``forbidden``/``session-not-found``/``token-expired``) raises
  :class:`StreamRefused` with a typed :attr:`~StreamRefused.reason`, after every event before it.
  ``STREAM_CLOSED`` itself is never yielded: it is the client's business.
- The connection state (``connecting``, ``open``, ``reconnecting``, then ``closed`` or ``error``,
  the live page's words, PROTOCOL §8) is :attr:`EventStream.state`, and each change is reported to
  ``on_state`` with why and how long until the next attempt, for UIs.

Reading happens in a task of its own that fills a bounded buffer, so cancelling a wait for the next
event (``asyncio.timeout``, ``wait_for``) loses nothing and leaves the stream usable; a consumer that
stops reading makes the buffer fill, the socket back up, and the relay close it as a slow consumer,
after which it resumes where it was. :attr:`EventStream.last_event_id` is the id of the last event
handed out: a new ``stream(..., last_event_id=...)`` resumes right after it (in another process).
The token is sent only as ``Authorization: Bearer`` and never appears in errors or state reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeAlias
from urllib.parse import quote

import attrs
import httpx
from httpx_sse import EventSource, SSEError

from rapidphoto_contract.events import (
    STREAM_CLOSED,
    Event,
    EventDecodeError,
    SessionClosed,
    StreamClosed,
    decode_event,
)
from rapidphoto_contract.ids import validate_session_id

SESSION_STREAM: Final = "/api/upload/sessions/{}/stream"
NOTIFICATION_STREAM: Final = "/api/upload/sessions/notifications/stream"
MULTI_STREAM: Final = "/api/upload/sessions/stream"

#: Until the relay's ``retry:`` arrives (it is the first frame of every stream), EventSource's usual.
DEFAULT_RETRY_SECONDS: Final = 3.0
#: Consecutive failed attempts back off from at least this, even when ``retry:`` is 0.
MIN_BACKOFF_SECONDS: Final = 0.25
#: At most this much of an error body is read (for the refusal's message).
MAX_ERROR_BODY: Final = 4096

ConnectionState: TypeAlias = Literal["connecting", "open", "reconnecting", "closed", "error"]

#: Why a stream was refused for good: the HTTP refusals, then the relay's final close reasons.
RefusalReason: TypeAlias = Literal[
    "bad-request",  # 400: a malformed request (an id the relay rejects, too many sessions, ...)
    "unauthorized",  # 401: no token, or one the relay does not accept
    "forbidden",  # 403, or STREAM_CLOSED forbidden: a session of another user
    "not-found",  # 404: no such endpoint on this relay
    "session-not-found",  # STREAM_CLOSED: the session never appeared, or is gone
    "token-expired",  # STREAM_CLOSED: the token expired while streaming
    "refused",  # any other 4xx, or a 200 that is not an event stream
]
_FINAL_CLOSE_REASONS: Final = frozenset({"forbidden", "session-not-found", "token-expired"})
_STATUS_REASONS: Final[Mapping[int, RefusalReason]] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
}


class StreamRefused(Exception):
    """The relay refused the stream for good; retrying would get the same answer.

    ``status`` is the HTTP status of a refused request, ``None`` when the relay closed an open
    stream with ``STREAM_CLOSED`` (then ``reason`` is its reason); ``detail`` is the relay's
    error message (its JSON ``error``), never the token.
    """

    def __init__(self, reason: RefusalReason, *, status: int | None, detail: str = "") -> None:
        self.reason: RefusalReason = reason
        self.status = status
        self.detail = detail
        where = f"HTTP {status}" if status is not None else "STREAM_CLOSED"
        super().__init__(f"stream refused: {reason} ({where}){': ' + detail if detail else ''}")


@attrs.frozen(kw_only=True)
class OtherEvent:
    """An event of a type the contract does not describe (or that does not match it): a direct
    publish by another backend (PROTOCOL §4), or an event type newer than this client."""

    type: str
    payload: Mapping[str, Any]
    event_id: str | None = None


StreamEvent: TypeAlias = Event | OtherEvent


@attrs.frozen(kw_only=True)
class StateChange:
    """A change of :attr:`EventStream.state`: ``reason`` says why (``"shutdown"``, ``"HTTP 503"``,
    ``"connection lost: ..."``), ``retry_in`` how many seconds until the next attempt
    (``reconnecting``), ``attempt`` how many connections failed in a row, ``url`` the relay."""

    state: ConnectionState
    url: str
    reason: str | None = None
    retry_in: float | None = None
    attempt: int = 0


StateCallback: TypeAlias = Callable[[StateChange], None]


def stream_path(sessions: Sequence[str], *, notifications: bool, multi: bool = False) -> str:
    """The path and query of the stream for ``sessions`` (+ notifications), PROTOCOL §5/§5.1."""
    unique = list(dict.fromkeys(validate_session_id(s, "sessions") for s in sessions))
    if not unique and not notifications:
        raise ValueError("nothing to stream: give sessions, or notifications=True")
    if not multi and len(unique) == 1 and not notifications:
        return SESSION_STREAM.format(quote(unique[0], safe=""))
    if not multi and not unique:
        return NOTIFICATION_STREAM
    query = "&".join(f"session={s}" for s in unique)  # ids are [A-Za-z0-9_-]: nothing to quote
    if notifications:
        query = f"{query}&notifications=1" if query else "notifications=1"
    return f"{MULTI_STREAM}?{query}"


def stream(
    relay_url: str | Sequence[str],
    *,
    token: str,
    sessions: Sequence[str] = (),
    notifications: bool = False,
    multi: bool = False,
    last_event_id: str | None = None,
    on_state: StateCallback | None = None,
    client: httpx.AsyncClient | None = None,
    idle_timeout: float = 60.0,
    connect_timeout: float = 10.0,
    max_backoff: float = 30.0,
    buffer: int = 1024,
) -> EventStream:
    """The events of ``sessions`` and/or the user's notifications, from the relay at ``relay_url``
    (or from several, in turn on each reconnection). ``multi`` takes the multi-session stream even
    for one session. ``client``: an httpx client to share between streams (left open; otherwise the
    stream makes its own and closes it). ``idle_timeout`` must exceed the relay's heartbeat period.
    Raises ``ValueError`` (:class:`~rapidphoto_contract.ids.InvalidId`) for a bad session id,
    before anything is sent."""
    urls = [relay_url] if isinstance(relay_url, str) else list(relay_url)
    if not urls:
        raise ValueError("relay_url: give at least one URL")
    path = stream_path(sessions, notifications=notifications, multi=multi)
    reader = _Reader(
        urls=[u.rstrip("/") for u in urls],
        path=path,
        sessions=list(dict.fromkeys(sessions)),
        notifications=notifications,
        token=token,
        resume_id=last_event_id,
        on_state=on_state,
        client=client,
        timeout=httpx.Timeout(connect_timeout, read=idle_timeout),
        max_backoff=max_backoff,
        queue=asyncio.Queue(maxsize=buffer),
    )
    return EventStream(reader)


class EventStream:
    """An async iterator of :data:`StreamEvent` and an async context manager (see the module).

    ``async for`` alone works and closes everything when the stream ends; a consumer that may leave
    early should use ``async with`` (or call :meth:`aclose`) so the connection closes at once.
    """

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        #: The SSE id of the last event handed out (a resume position), or the one given at start.
        self.last_event_id: str | None = reader.resume_id

    @property
    def state(self) -> ConnectionState:
        return self._reader.state

    @property
    def close_reason(self) -> Literal["completed"] | None:
        """``"completed"`` once the relay said every session is done (STREAM_CLOSED, or 204)."""
        return "completed" if self._reader.completed else None

    @property
    def retry_seconds(self) -> float:
        """The reconnection delay the relay asked for (``retry:``)."""
        return self._reader.retry

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._reader.run(), name="rapidphoto-stream")

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._finished:
            raise StopAsyncIteration
        self._start()
        item = await self._reader.queue.get()
        if isinstance(item, _End):
            self._finished = True
            await self.aclose()
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        event, self.last_event_id = item
        return event

    async def aclose(self) -> None:
        """Stop reading and close the connection (and the httpx client, if the stream made it)."""
        self._finished = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif task is None:
            await self._reader.close_client()

    def __del__(self) -> None:
        # A stream dropped without aclose() (a bare ``async for`` left by ``break``): its task holds
        # only the reader, not this object, so cancelling it here closes the connection.
        if self._task is not None and not self._task.done():
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._task.cancel()


@attrs.frozen
class _End:
    """The last queue item: the stream ended normally (``error`` None) or with an exception."""

    error: BaseException | None = None


@attrs.frozen
class _Again:
    """One connection is over and another should follow: why, and the relay's ``Retry-After``."""

    reason: str
    opened: bool
    retry_after: float | None = None


_Item: TypeAlias = tuple[StreamEvent, str | None] | _End


@attrs.define(kw_only=True)
class _Reader:
    """The connection loop, in its own task (it never refers to the :class:`EventStream`)."""

    urls: list[str]
    path: str
    sessions: list[str]
    notifications: bool
    token: str = attrs.field(repr=False)
    resume_id: str | None
    on_state: StateCallback | None
    client: httpx.AsyncClient | None
    timeout: httpx.Timeout
    max_backoff: float
    queue: asyncio.Queue[_Item]
    state: ConnectionState = "connecting"
    retry: float = DEFAULT_RETRY_SECONDS
    completed: bool = False
    url: str = ""
    _owns_client: bool = False

    async def run(self) -> None:
        # The client is closed before the end is queued: the consumer that reads the end finds
        # this task finished, with nothing left to cancel.
        end = _End()
        try:
            try:
                await self._loop()
            finally:
                await self.close_client()
        except StreamRefused as exc:
            self._report("error", self.url, reason=exc.reason)
            end = _End(exc)
        except Exception as exc:  # a bug or a broken callback: the consumer must hear of it
            self._report("error", self.url, reason=type(exc).__name__)
            end = _End(exc)
        else:
            self.completed = True
            self._report("closed", self.url, reason="completed")
        await self.queue.put(end)

    async def close_client(self) -> None:
        if self._owns_client and self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    async def _loop(self) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout)
            self._owns_client = True
        failures = 0
        turn = 0
        self.url = self.urls[0]
        self._report("connecting", self.url)
        while True:
            outcome = await self._connect(self.url)
            if outcome is None or not self.path:
                return
            failures = 0 if outcome.opened else failures + 1
            if outcome.retry_after is not None:
                delay = outcome.retry_after
            elif outcome.opened:
                delay = self.retry
            else:
                base = max(self.retry, MIN_BACKOFF_SECONDS)
                delay = min(base * 2 ** min(failures - 1, 16), self.max_backoff)
            turn += 1
            self.url = self.urls[turn % len(self.urls)]
            self._report(
                "reconnecting", self.url, reason=outcome.reason, retry_in=delay, attempt=failures
            )
            await asyncio.sleep(delay)

    async def _connect(self, url: str) -> _Again | None:
        """One connection: ``None`` when the stream is over for good, else why to connect again."""
        assert self.client is not None
        headers = {
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
            "Authorization": f"Bearer {self.token}",
        }
        if self.resume_id:
            headers["Last-Event-ID"] = self.resume_id
        request = self.client.build_request("GET", url + self.path, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            return _Again(f"cannot connect: {_describe(exc)}", opened=False)
        try:
            return await self._read(url, response)
        except (httpx.TransportError, SSEError) as exc:
            # Read timeout (no heartbeat), reset, or a response cut inside a chunk.
            return _Again(f"connection lost: {_describe(exc)}", opened=self.state == "open")
        finally:
            await response.aclose()

    async def _read(self, url: str, response: httpx.Response) -> _Again | None:
        status = response.status_code
        if status == 204:  # PROTOCOL §5: resumed at the end of a completed session
            return None
        if status in (429, 503):
            return _Again(f"HTTP {status}", opened=False, retry_after=_retry_after(response))
        if status >= 500:
            return _Again(f"HTTP {status}", opened=False)
        if status != 200:
            reason = _STATUS_REASONS.get(status, "refused")
            raise StreamRefused(reason, status=status, detail=await _error_detail(response))
        content_type = response.headers.get("content-type", "").partition(";")[0].strip()
        if content_type != "text/event-stream":
            raise StreamRefused("refused", status=status, detail=f"not a stream: {content_type}")
        self._report("open", url)
        # WHATWG: the last event id outlives a connection, and is set at every dispatch (also of
        # a frame without data). httpx-sse's decoder starts each response from "", so only a
        # change of its id within this response is an ``id:`` field; otherwise the retry frame
        # of a resumed stream would erase the position it resumed from.
        seen_id = ""
        async for sse in EventSource(response).aiter_sse():
            if sse.retry is not None and sse.retry >= 0:
                self.retry = sse.retry / 1000
            if sse.id != seen_id:
                seen_id = sse.id
                self.resume_id = sse.id or None
            if not sse.data:
                continue  # the retry frame; httpx-sse also dispatches heartbeats once an id was seen
            event = _decode(sse.data)
            if isinstance(event, StreamClosed):
                if event.reason == "completed":
                    return None
                if event.reason in _FINAL_CLOSE_REASONS:
                    raise StreamRefused(event.reason, status=None)  # type: ignore[arg-type]
                return _Again(event.reason, opened=True)  # slow-consumer, shutdown, or newer
            if isinstance(event, SessionClosed) and event.session_id in self.sessions:
                self._forget(event.session_id)
            await self.queue.put((event, self.resume_id))
        return _Again("the relay ended the stream", opened=True)

    def _forget(self, session_id: str) -> None:
        """A multi-session stream went on without ``session_id`` (PROTOCOL §5.1): reconnections
        no longer ask for it. Asked again, a session of another user would now be a 403 for the
        whole stream; the cursor still records it as closed. The path stays the multi-session
        one, which alone understands the cursor."""
        self.sessions.remove(session_id)
        if self.sessions or self.notifications:
            self.path = stream_path(self.sessions, notifications=self.notifications, multi=True)
        else:
            self.path = ""  # every session closed: the relay ends the stream, nothing to resume

    def _report(
        self,
        state: ConnectionState,
        url: str,
        *,
        reason: str | None = None,
        retry_in: float | None = None,
        attempt: int = 0,
    ) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(
                StateChange(state=state, url=url, reason=reason, retry_in=retry_in, attempt=attempt)
            )


def _decode(data: str) -> StreamEvent:
    try:
        return decode_event(data)
    except EventDecodeError:
        pass
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        # The relay drops such payloads (PROTOCOL §4); if one comes anyway, it is shown, not fatal.
        return OtherEvent(type="", payload={"data": data})
    if payload["type"] == STREAM_CLOSED:  # malformed close: resume, as for an unknown reason
        return StreamClosed(reason=str(payload.get("reason", "")))
    event_id = payload.get("eventId")
    return OtherEvent(
        type=payload["type"],
        payload=payload,
        event_id=event_id if isinstance(event_id, str) else None,
    )


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


async def _error_detail(response: httpx.Response) -> str:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        parsed = json.loads(body[:MAX_ERROR_BODY])
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return str(parsed["error"])
    return ""


def _describe(exc: Exception) -> str:
    # httpx's messages may quote the URL, never a header: the token stays out.
    return str(exc) or type(exc).__name__


__all__ = [
    "ConnectionState",
    "EventStream",
    "OtherEvent",
    "RefusalReason",
    "StateChange",
    "StreamEvent",
    "StreamRefused",
    "stream",
    "stream_path",
]
