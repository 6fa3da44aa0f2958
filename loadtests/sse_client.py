"""A raw-socket SSE client for the load tests: HTTP/1.1 by hand, frames parsed as they arrive.

Why not locust's ``HttpUser`` / requests' ``iter_lines``: they read the body in fixed-size chunks and
hand out lines only once a chunk is full, which adds seconds of fake latency on a quiet stream. Here
each HTTP chunk the relay sends (one ``send`` per wake-up, see ``rapidphoto_relay.streams``) is read
as soon as it lands, with ``readline`` for the chunk-size line and an exact read for its body, and
every frame in it is stamped with the wall-clock time it was read (compared with the event's
``occurredAt``, which the worker takes from Redis' clock on the same machine).

Uses ``gevent.socket`` so that a thousand streams share one process cooperatively (locust's model).
Only loopback targets are accepted: these tests never point at anything else.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from gevent import socket

#: Hosts a load test may target (load tests run against a local stack only).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: A response head larger than this is not from our relay.
MAX_HEAD_BYTES = 16 * 1024


class NotLoopback(ValueError):
    """A target URL whose host is not a loopback address."""


def loopback_origin(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` loopback URL, else :class:`NotLoopback`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise NotLoopback(f"{url!r}: only http:// on a loopback address is a load-test target")
    return parts.hostname, parts.port or 80


class StreamError(Exception):
    """The connection failed or the response was not a stream (``status`` set when one came)."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Frame:
    """One SSE frame (text up to a blank line); ``received_at``: ``time.time()`` when its last
    chunk was read."""

    received_at: float
    size: int
    event: str | None = None
    id: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_heartbeat(self) -> bool:
        return self.data is None and self.retry is None and bool(self.comments)

    def json(self) -> Any:
        return json.loads(self.data) if self.data is not None else None


class _FrameParser:
    """Lines in (WHATWG "event stream interpretation"), frames out at each blank line."""

    def __init__(self) -> None:
        self._pending = b""
        self._frame: Frame | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes, now: float) -> list[Frame]:
        out: list[Frame] = []
        buf = self._pending + chunk
        lines = buf.split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the next chunk
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if self._frame is None:
                self._frame = Frame(received_at=now, size=0)
            frame = self._frame
            frame.size += len(raw) + 1
            if not line:
                if frame.size > 1 or frame.comments:
                    frame.received_at = now  # complete only now (it may span chunks)
                    if self._data:
                        frame.data = "\n".join(self._data)
                    out.append(frame)
                self._frame, self._data = None, []
                continue
            text = line.decode("utf-8", errors="replace")
            if text.startswith(":"):
                frame.comments.append(text[1:].lstrip(" "))
                continue
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "event":
                frame.event = value
            elif name == "id":
                frame.id = value
            elif name == "retry" and value.isdigit():
                frame.retry = int(value)
        return out


class SSEConnection:
    """One stream: :meth:`open` sends the request and reads the head, :meth:`frames` yields frames.

    ``read_timeout`` bounds every blocking read (``socket.timeout`` when the relay goes silent).
    """

    def __init__(
        self,
        url: str,
        path: str,
        token: str,
        *,
        last_event_id: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.host, self.port = loopback_origin(url)
        self.path = path
        self.token = token
        self.last_event_id = last_event_id
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.opened_at = 0.0
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._chunked = False
        self.eof = False

    def _request(self) -> bytes:
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Authorization: Bearer {self.token}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        if self.last_event_id is not None:
            lines.append(f"Last-Event-ID: {self.last_event_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def open(self) -> int:
        """Connect, send the request, read status and headers; the status (200 means a stream).

        A non-200 answer raises :class:`StreamError` with the status and (bounded) body.
        """
        started = time.time()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise StreamError(f"connect: {exc}") from None
        self._sock = sock
        sock.settimeout(self.read_timeout)
        sock.sendall(self._request())
        self._file = sock.makefile("rb")
        status_line = self._readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise StreamError(f"bad status line {status_line[:80]!r}")
        self.status = int(parts[1])
        size = len(status_line)
        while True:
            line = self._readline()
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise StreamError("response head too large", self.status)
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.opened_at = started
        if self.status != 200:
            body = self._read_error_body()
            raise StreamError(f"HTTP {self.status}", self.status, body)
        return self.status

    def _readline(self) -> bytes:
        assert self._file is not None
        line = self._file.readline(MAX_HEAD_BYTES)
        if not line:
            self.eof = True
            raise StreamError("connection closed by the relay", self.status)
        return line

    def _read_error_body(self) -> bytes:
        assert self._file is not None
        length = self.headers.get("content-length")
        if length is not None and length.isdigit():
            return self._file.read(min(int(length), 4096))
        if self._chunked:
            return next(self._chunks(), b"")
        return b""

    def _chunks(self) -> Iterator[bytes]:
        """The body as it arrives: one HTTP chunk at a time (or whatever a read returns)."""
        assert self._file is not None
        file = self._file
        if not self._chunked:
            while True:
                data = file.read1(65536)  # type: ignore[attr-defined]
                if not data:
                    self.eof = True
                    return
                yield data
        while True:
            size_line = self._readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise StreamError(f"bad chunk size {size_line[:20]!r}", self.status) from None
            if size == 0:  # last chunk: the relay ended the response
                self.eof = True
                return
            data = file.read(size)
            if len(data) < size:
                self.eof = True
                raise StreamError("connection closed inside a chunk", self.status)
            file.read(2)  # CRLF after the chunk data
            yield data

    def frames(self) -> Iterator[Frame]:
        """Frames until the relay ends the response (then returns) or the connection fails."""
        parser = _FrameParser()
        for chunk in self._chunks():
            yield from parser.feed(chunk, time.time())

    def close(self, *, abort: bool = False) -> None:
        """Close; ``abort`` resets the connection (RST) instead of a polite FIN."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if abort:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            if self._file is not None:
                self._file.close()
        finally:
            sock.close()
