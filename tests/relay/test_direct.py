"""Direct writes (``rapidphoto_relay.direct``): chunk framing, the coalescer, and the uvicorn seam.

The seam test runs the real uvicorn (httptools) in-process: ``DirectWriter`` relies on attributes
of uvicorn's connection object, so an upgrade that changes them must fail here, not in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn
from litestar.types import Receive, Scope, Send

from rapidphoto_contract import keys
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_contract.tokens import mint_token
from rapidphoto_relay.coalescer import Coalescer
from rapidphoto_relay.direct import (
    SERVER_SEND_KEY,
    DirectWriter,
    ServerSendCapture,
    encode_chunk,
)
from rapidphoto_relay.main import asgi_app
from tests.conftest import TEST_SECRET
from tests.relay.conftest import Relay, RelayFactory
from tests.support.redis_server import RedisServer, free_port
from tests.support.seed import Seeder
from tests.support.sse import open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


def session_path(session_id: str) -> str:
    return f"/api/upload/sessions/{session_id}/stream"


def test_encode_chunk_is_http11_chunked_coding() -> None:
    assert encode_chunk(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    assert encode_chunk(b"y" * 300).startswith(b"12c\r\n")


class _Stream:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def flush(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


async def test_coalescer_flushes_everything_held_once_at_the_first_due_time() -> None:
    coalescer = Coalescer()
    log: list[str] = []
    start = time.monotonic()
    coalescer.hold(_Stream(log, "a"), start + 0.05)
    coalescer.hold(_Stream(log, "b", fail=True), start + 0.2)  # a failing stream stops no one
    coalescer.hold(_Stream(log, "c"), start + 0.2)
    assert len(coalescer) == 3
    await asyncio.sleep(0.02)
    assert log == []
    await asyncio.sleep(0.08)
    assert log == ["a", "b", "c"]
    assert len(coalescer) == 0
    coalescer.hold(_Stream(log, "d"), time.monotonic())  # a new slot gets a new timer
    await asyncio.sleep(0.01)
    assert log == ["a", "b", "c", "d"]


async def test_attach_refuses_anything_but_uvicorn_httptools() -> None:
    async def plain_send(message: Any) -> None: ...

    scope: Any = {"type": "http"}
    assert DirectWriter.attach(scope) is None  # no server send captured (in-process clients)
    scope[SERVER_SEND_KEY] = plain_send
    assert DirectWriter.attach(scope) is None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def _uvicorn(app: Any, lifespan: Literal["on", "off"] = "off") -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", lifespan=lifespan)
    config.log_config = None
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.ready.wait(), 10)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_direct_writes_share_the_connection_with_asgi_sends_in_order() -> None:
    """Through real uvicorn: ASGI head, direct chunks, an ASGI chunk, the ASGI end, in that order;
    and once the client is gone the writer says so instead of writing."""
    attached: list[DirectWriter | None] = []
    client_gone = asyncio.Event()
    after_disconnect: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        writer = DirectWriter.attach(scope)
        attached.append(writer)
        assert writer is not None
        assert writer.writable()
        writer.write(encode_chunk(b"one\n"))
        writer.write(encode_chunk(b"two\n"))
        await send({"type": "http.response.body", "body": b"three\n", "more_body": True})
        assert writer.writable()
        writer.write(encode_chunk(b"four\n"))
        if scope["path"] == "/end":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        while (await receive())["type"] != "http.disconnect":
            pass
        after_disconnect.append(writer.writable())
        client_gone.set()

    async with _uvicorn(ServerSendCapture(app)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /end HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert body == (b"4\r\none\n\r\n4\r\ntwo\n\r\n6\r\nthree\n\r\n5\r\nfour\n\r\n0\r\n\r\n")
        # keep-alive still works after direct writes: uvicorn's own state is intact
        writer.write(b"GET /stay HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"four\n\r\n")
        writer.close()
        await asyncio.wait_for(client_gone.wait(), 5)
    assert after_disconnect == [False]
    assert all(w is not None for w in attached)


# --- over real HTTP, through the relay ------------------------------------------------------------


async def test_a_burst_faster_than_the_write_interval_arrives_whole_and_in_order(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    """Frames held for a coalesced write count against the stream's buffer: a client that reads
    everything must still never be closed as a slow consumer, however fast events come."""
    relay = relay_factory(SSE_BUFFER_EVENTS="4")
    user = ids("u")
    channel = keys.notification_channel(user)
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(user)) as stream:
        await stream.next_frame()
        await seed.publish_raw(channel, '{"type":"notification","n":-1}')
        assert (await stream.next_event()).json()["n"] == -1  # written: the next ones are held
        async with seed.redis.pipeline(transaction=False) as pipe:
            for n in range(60):
                pipe.publish(channel, json.dumps({"type": "notification", "n": n}))
            await pipe.execute()
        events = await stream.take(60)
        assert [e.json()["n"] for e in events] == list(range(60))
        await stream.expect_silence(0.2)  # no STREAM_CLOSED
    assert relay.metric("rapidphoto_relay_slow_consumer_closes_total") == 0


async def test_session_events_in_quick_succession_then_completion(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    """The completing event is never held: the writer delivers what was held before it, then
    closes the stream."""
    session = ids("s")
    await seed.start(session, "u1", 12)
    async with open_sse(relay.base_url, session_path(session), token=relay.token("u1")) as stream:
        await stream.next_event()  # snapshot
        log_ids = await seed.upload_many(session, 12)
        frames = await stream.wait_ended(10)
    events = [f for f in frames if f.is_event]
    assert [e.event for e in events][-2:] == ["SESSION_COMPLETED", "STREAM_CLOSED"]
    assert [e.id for e in events[:-1]] == log_ids


async def test_closed_streams_leave_no_reference_cycles(relay_redis: RedisServer) -> None:
    """Regression: ``ServerSendCapture`` left uvicorn's bound ``send`` in the scope, which
    uvicorn's connection object holds, so every closed stream left ~20 objects in a reference
    cycle. Only the full collector frees those, and with 10,000 streams and 100 reconnections/s
    it ran every ~25 s for ~1 s, stalling every stream of the relay."""
    settings = RelayConfig.from_env({"REDIS_URL": relay_redis.url, "JWT_SECRET": TEST_SECRET})
    token = mint_token("gc-user", key=TEST_SECRET)
    request = (
        f"GET {NOTIFICATIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    async with _uvicorn(asgi_app(settings), lifespan="on") as port:
        gc.collect()
        gc.disable()  # cyclic garbage now stays until the collection below shows it
        try:
            for _ in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                await asyncio.wait_for(reader.readuntil(b"retry:"), 10)
                writer.close()
            for _ in range(200):  # until the server has released all of them
                if b'"openStreams":0' in await _get(port, "/health/ready"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("streams still open after 10 s")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            leaked = sorted(
                {
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in gc.garbage
                    if str(getattr(type(o), "__module__", "")).startswith(
                        ("uvicorn", "rapidphoto_relay", "litestar")
                    )
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert leaked == []


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
