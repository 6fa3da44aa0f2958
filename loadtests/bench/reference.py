"""The reference server of a capacity run (``--target reference``): a bare relay.

One ``PSUBSCRIBE``, each payload framed once, pre-encoded chunks written straight to every socket.
No auth check (the token's ``sub`` is read, not verified), no buffers, no limits: the floor a
Python relay on asyncio + uvloop can reach, and the ceiling the benchmark's client can measure.
A relay figure close to it is client-bound, not relay-bound.

    python -m loadtests.bench.reference --port P --redis-url U     # from the repository root
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
from collections.abc import Sequence

import uvloop

MODULE = "loadtests.bench.reference"


def command(port: int, redis_url: str) -> list[str]:
    """The command line of the reference server (run from the repository root)."""
    return [sys.executable, "-m", MODULE, "--port", str(port), "--redis-url", redis_url]


def main(argv: Sequence[str]) -> None:
    # Imported here: the benchmark's own process imports this module for ``command`` only.
    import hiredis
    import msgspec

    from rapidphoto_contract.keys import NOTIFICATION_CHANNEL_PREFIX
    from rapidphoto_relay import sse

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    redis_host, redis_port = args.redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    channels: dict[bytes, set[asyncio.Transport]] = {}
    decoder = msgspec.json.Decoder()
    ready = False
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    def chunk(body: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(body), body)

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.channel: bytes | None = None
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            if self.channel is not None:
                return
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            request = self.buf.split(b"\r\n")
            if b"/health" in request[0]:
                status = b"200 OK" if ready else b"503 Service Unavailable"
                self.transport.write(b"HTTP/1.1 %b\r\ncontent-length: 0\r\n\r\n" % status)
                self.transport.close()
                return
            token = next(
                line.split(b" ")[-1]
                for line in request
                if line.lower().startswith(b"authorization:")
            )
            claims = token.split(b".")[1]
            sub = json.loads(base64.urlsafe_b64decode(claims + b"=" * (-len(claims) % 4)))["sub"]
            self.channel = (NOTIFICATION_CHANNEL_PREFIX + sub).encode()
            channels.setdefault(self.channel, set()).add(self.transport)
            self.transport.write(head + chunk(sse.retry(2000)))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.channel is not None and self.transport is not None:
                channels.get(self.channel, set()).discard(self.transport)

    class PubSub(asyncio.Protocol):
        def __init__(self) -> None:
            self.reader = hiredis.Reader()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            pattern = (NOTIFICATION_CHANNEL_PREFIX + "*").encode()
            transport.write(  # type: ignore[attr-defined]
                b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%b\r\n" % (len(pattern), pattern)
            )

        def data_received(self, data: bytes) -> None:
            nonlocal ready
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if reply[0] == b"pmessage":
                    targets = channels.get(reply[2])
                    if targets:
                        obj = decoder.decode(reply[3])
                        frame = chunk(
                            sse.event(reply[3], event_type=obj["type"], event_id=obj["eventId"])
                        )
                        for transport in targets:
                            transport.write(frame)
                elif reply[0] == b"psubscribe":
                    ready = True

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(PubSub, redis_host, int(redis_port))
        server = await loop.create_server(Client, "127.0.0.1", args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve())


if __name__ == "__main__":
    main(sys.argv[1:])
