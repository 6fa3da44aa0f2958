"""Direct writes: a live frame goes from the hub straight to each stream's socket.

Through ASGI, one live event on a channel with N streams costs N task wake-ups, N futures, N
``send`` coroutines (Litestar's exception wrapper, then the server's) and N message dicts before the
N ``write`` calls that matter; with 1,000 streams on one channel that framework work per subscriber
was half of the relay's CPU and most of its garbage. So while a stream's task is idle and in sync
(``writer.py``), the hub writes the frame itself, already encoded as an HTTP/1.1 chunk once per
message, with one ``transport.write`` per stream and no task switch.

This needs the server's own connection object, which ASGI does not expose: :class:`ServerSendCapture`
(the outermost ASGI layer, installed by ``main.py``) keeps the server's ``send`` in the scope, and
:meth:`DirectWriter.attach` accepts it only from uvicorn's httptools protocol, once the response
head has gone out with chunked transfer encoding. Anything else (another server, uvicorn's h11
protocol, an in-process test client, or a uvicorn whose private attributes no longer match:
``uvicorn_seam.py`` turns :attr:`DirectWriter.enabled` off at start-up) keeps the ASGI path: same
bytes, same order, just slower.

The connection is written to only when a write cannot block: not when the server paused writing
(the client is not reading; the frame is queued and the stream's task blocks in ``send`` as usual,
which is what makes a slow consumer visible) nor after the client went away. Callers check
:meth:`DirectWriter.writable` first.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, cast

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

#: Scope key under which :class:`ServerSendCapture` keeps the server's own ``send``.
SERVER_SEND_KEY: Final = "rapidphoto.server_send"
#: The one server protocol whose connection objects we know how to write to.
HTTPTOOLS_MODULE: Final = "uvicorn.protocols.http.httptools_impl"


def encode_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of HTTP/1.1 chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class ServerSendCapture:
    """Outermost ASGI layer: remember the server's ``send`` before any middleware wraps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        slots = cast("dict[str, Any]", scope)
        slots[SERVER_SEND_KEY] = send
        try:
            await self.app(scope, receive, send)
        finally:
            # uvicorn's connection holds the scope: left in it, its own bound ``send`` would make a
            # reference cycle, and every closed stream 20 objects of garbage for the slow full GC.
            del slots[SERVER_SEND_KEY]


class DirectWriter:
    """Writes pre-encoded chunks to one uvicorn (httptools) connection, when that cannot block."""

    __slots__ = ("_cycle", "_transport")

    #: Off when uvicorn's private attributes are not the ones this class reads (``uvicorn_seam.py``).
    enabled: ClassVar[bool] = True

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport

    @classmethod
    def attach(cls, scope: Scope) -> DirectWriter | None:
        """The connection of this request, if the server is one we can write to directly.

        Call it after ``http.response.start`` was sent: only then has the server chosen chunked
        encoding (it does when the response has no ``Content-Length``, as ours never has).
        """
        if not cls.enabled:
            return None
        send = cast("dict[str, Any]", scope).get(SERVER_SEND_KEY)
        cycle = getattr(send, "__self__", None)
        if type(cycle).__module__ != HTTPTOOLS_MODULE:
            return None
        if getattr(cycle, "chunked_encoding", None) is not True or not hasattr(cycle, "flow"):
            return None
        return cls(cycle)

    def writable(self) -> bool:
        """A write now would neither block nor go to a connection that is gone."""
        cycle = self._cycle
        return not (cycle.flow.write_paused or cycle.disconnected or self._transport.is_closing())

    def write(self, chunk: bytes) -> None:
        """Write ``chunk`` now: only after :meth:`writable` said it can go."""
        self._transport.write(chunk)
