"""SSE test clients: a real async HTTP one (httpx) and a raw-socket one for many/slow streams.

:func:`open_sse` returns an :class:`SSEStream` that parses frames *as they arrive* in a background
task and keeps everything: raw frame bytes, ``id``, ``event``, ``data``, ``retry`` and comment lines.
Tests wait for what they expect with timeouts (:meth:`SSEStream.next_event`, :meth:`until`), never
with sleeps. A refused connection (401/403/...) is returned too, with its status, headers and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

TokenVia = Literal["header", "cookie", "query"]


@dataclass
class SSEFrame:
    """One frame (the text between blank lines), parsed by the WHATWG rules we rely on."""

    raw: bytes
    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_event(self) -> bool:
        return self.data is not None

    def json(self) -> Any:
        assert self.data is not None, f"frame has no data: {self.raw!r}"
        return json.loads(self.data)


def parse_frame(raw: bytes) -> SSEFrame:
    frame = SSEFrame(raw=raw)
    data_lines: list[str] = []
    for line in raw.decode("utf-8").split("\n"):
        if line == "":
            continue
        if line.startswith(":"):
            frame.comments.append(line[1:].lstrip(" "))
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            frame.event = value
        elif name == "id":
            frame.id = value
        elif name == "retry":
            frame.retry = int(value)
    if data_lines:
        frame.data = "\n".join(data_lines)
    return frame


class FrameSplitter:
    """Bytes in, complete frames out (the relay ends lines with ``\\n`` only)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        self._buffer += chunk
        frames: list[SSEFrame] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return frames
            raw, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            frames.append(parse_frame(raw))


class StreamEnded(Exception):
    """The server closed the stream."""


class SSEStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.frames: list[SSEFrame] = []
        self.body = b""
        self.ended = False
        self._queue: asyncio.Queue[SSEFrame | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        splitter = FrameSplitter()
        try:
            async for chunk in self.response.aiter_raw():
                for frame in splitter.feed(chunk):
                    self.frames.append(frame)
                    await self._queue.put(frame)
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ended = True
            await self._queue.put(None)

    @property
    def retry(self) -> int | None:
        return next((f.retry for f in self.frames if f.retry is not None), None)

    @property
    def events(self) -> list[SSEFrame]:
        return [f for f in self.frames if f.is_event]

    @property
    def comments(self) -> list[str]:
        return [c for f in self.frames for c in f.comments]

    def error(self) -> Any:
        return json.loads(self.body)

    async def next_frame(self, timeout: float = 5.0) -> SSEFrame:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                frame = await self._queue.get()
        except TimeoutError:
            raise TimeoutError(
                f"no SSE frame within {timeout}s; got so far: {[f.raw for f in self.frames]}"
            ) from None
        if frame is None:
            await self._queue.put(None)  # stay ended for later calls
            raise StreamEnded(f"stream ended; frames: {[f.raw for f in self.frames]}")
        return frame

    async def next_event(self, timeout: float = 5.0) -> SSEFrame:  # noqa: ASYNC109
        """The next frame with data, skipping comments and the retry frame."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_frame(timeout)
                if frame.is_event:
                    return frame

    async def take(self, count: int, timeout: float = 5.0) -> list[SSEFrame]:  # noqa: ASYNC109
        return [await self.next_event(timeout) for _ in range(count)]

    async def until(self, event_type: str, timeout: float = 5.0) -> list[SSEFrame]:  # noqa: ASYNC109
        """Events up to and including the first one of ``event_type``."""
        out: list[SSEFrame] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_event(timeout)
                out.append(frame)
                if frame.event == event_type:
                    return out

    async def wait_ended(self, timeout: float = 5.0) -> list[SSEFrame]:  # noqa: ASYNC109
        """Every frame until the server closes the stream."""
        out: list[SSEFrame] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    out.append(await self.next_frame(timeout))
                except StreamEnded:
                    return out

    async def expect_silence(self, seconds: float) -> None:
        """No *event* (comments allowed) for ``seconds``."""
        with contextlib.suppress(TimeoutError):
            frame = await self.next_event(seconds)
            raise AssertionError(f"expected no event, got {frame.raw!r}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.response.aclose()


@contextlib.asynccontextmanager
async def open_sse(
    base_url: str,
    path: str,
    *,
    token: str | None = None,
    via: TokenVia = "header",
    cookie_name: str = "access_token",
    last_event_id: str | None = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[SSEStream]:
    """Open ``path`` as an SSE stream; yields the stream whatever the status."""
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    query = dict(params or {})
    cookies: dict[str, str] = {}
    if token is not None:
        if via == "header":
            hdrs["Authorization"] = f"Bearer {token}"
        elif via == "cookie":
            cookies[cookie_name] = token
        else:
            query["access_token"] = token
    if last_event_id is not None:
        hdrs["Last-Event-ID"] = last_event_id
    if cookies:
        hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    timeout = httpx.Timeout(connect_timeout, read=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        # ``params=None`` when empty: an empty mapping would replace the query string of ``path``.
        request = client.build_request("GET", path, params=query or None, headers=hdrs)
        response = await client.send(request, stream=True)
        stream = SSEStream(response)
        try:
            if response.status_code == 200:
                stream.start()
            else:
                stream.body = await response.aread()
            yield stream
        finally:
            await stream.aclose()


# --- raw sockets: thousands of streams, or a client that stops reading ---------------------------


class RawStream:
    """A minimal SSE client over a plain socket (no HTTP library), for load and slow clients."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.head = b""
        self._splitter = FrameSplitter()
        self._chunked = b""

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        path: str,
        headers: Mapping[str, str],
        *,
        rcvbuf: int | None = None,
    ) -> RawStream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        stream = cls(reader, writer)
        return stream

    async def read_head(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            self.head = await self.reader.readuntil(b"\r\n\r\n")
        self.status = int(self.head.split(b" ", 2)[1])
        return self.status

    async def read_frames(self, timeout: float = 5.0) -> list[SSEFrame]:  # noqa: ASYNC109
        """Whatever complete frames arrive in the next read (de-chunked); [] at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    return []
                frames = self._splitter.feed(self._dechunk(chunk))
                if frames:
                    return frames

    def _dechunk(self, chunk: bytes) -> bytes:
        # HTTP/1.1 chunked transfer coding: "<hex>\r\n<bytes>\r\n" ... "0\r\n\r\n".
        self._chunked += chunk
        out = b""
        while True:
            line_end = self._chunked.find(b"\r\n")
            if line_end < 0:
                return out
            size = int(self._chunked[:line_end], 16)
            if len(self._chunked) < line_end + 2 + size + 2:
                return out
            out += self._chunked[line_end + 2 : line_end + 2 + size]
            self._chunked = self._chunked[line_end + 2 + size + 2 :]

    def close(self) -> None:
        self.writer.close()
