"""The deployed nginx configuration in front of two real relays and a real worker.

Debian's nginx runs unprivileged from a temporary prefix with deploy/nginx/nginx.conf.template
rendered in (tests/support/nginx.py), so what is tested is what compose.yaml deploys. Every stream
here authenticates with the ``access_token`` query parameter, the form that ends up in request lines.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.tokens import mint_token
from rapidphoto_tools.client import UploadJobsClient
from tests.conftest import TEST_SECRET
from tests.support.nginx import NginxServer
from tests.support.processes import ManagedProcess, start_relay, start_worker, wait_until
from tests.support.redis_server import free_port
from tests.support.sse import SSEFrame, SSEStream, StreamEnded, open_sse

pytestmark = pytest.mark.e2e

#: Publication to arrival through nginx: a buffering or compressing proxy holds small events back
#: for whole seconds (until a buffer fills or the next heartbeat pushes them out).
MAX_DELIVERY_MS = 100.0


@dataclass
class Stack:
    nginx: NginxServer
    relays: dict[int, ManagedProcess]  # port -> process
    worker: ManagedProcess
    redis_url: str

    def token(self, user_id: str) -> str:
        return mint_token(user_id, key=TEST_SECRET)


@pytest.fixture
def stack(redis_url: str, log_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    started: list[ManagedProcess] = []
    nginx: NginxServer | None = None
    try:
        worker = start_worker(redis_url, log_dir)
        started.append(worker)
        ports = [free_port(), free_port()]
        # Both relays start at once (each takes a few seconds to import and connect).
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(
                    start_relay, redis_url, port, log_dir, name=f"relay-{n}", JWT_SECRET=TEST_SECRET
                )
                for n, port in enumerate(ports, 1)
            ]
            relays = {port: future.result() for port, future in zip(ports, futures, strict=True)}
        started.extend(relays.values())
        nginx = NginxServer(tmp_path / "nginx", [f"127.0.0.1:{port}" for port in relays]).start()
        yield Stack(nginx, relays, worker, redis_url)
    finally:
        if nginx is not None:
            nginx.stop()
        for process in reversed(started):
            process.stop()


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[UploadJobsClient]:
    async with UploadJobsClient.connect(redis_url) as client:
        yield client


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def open_streams(port: int) -> float:
    """Streams open on the relay at ``port``, from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("rapidphoto_relay_open_streams")
    )


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (every 10 ms) until it holds; fail naming ``what`` after 15 s."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after 15 s waiting for {what}")


async def wait_for_state(redis: aioredis.Redis, session_id: str, field: str, value: str) -> None:
    async def reached() -> bool:
        return bool(await redis.hget(keys.session_state_key(session_id), field) == value)

    await eventually(reached, f"{session_id}: {field} = {value}")


async def wait_for_log_length(redis: aioredis.Redis, session_id: str, length: int) -> None:
    async def reached() -> bool:
        return int(await redis.xlen(keys.session_log_key(session_id))) >= length

    await eventually(reached, f"{session_id}: {length} log entries")


async def next_event_at(stream: SSEStream, within: float = 5.0) -> tuple[SSEFrame, float]:
    """The next event and when it arrived (ms since the epoch, the clock Redis ids use)."""
    frame = await stream.next_event(within)
    return frame, time.time() * 1000


def event_time_ms(frame: SSEFrame) -> float:
    """When the worker's script appended (and, in the same step, published) the event."""
    assert frame.id is not None
    return float(frame.id.split("-")[0])


async def test_events_arrive_unbuffered_through_nginx(
    stack: Stack, jobs: UploadJobsClient, redis_client: aioredis.Redis
) -> None:
    session, user = fresh("s"), fresh("u")
    await jobs.start_upload_session(session, user, total_photos=5)
    await wait_for_state(redis_client, session, keys.STATE_STATUS, "IN_PROGRESS")

    async with open_sse(
        stack.nginx.url,
        f"/api/upload/sessions/{session}/stream",
        token=stack.token(user),
        via="query",
        headers={"Accept-Encoding": "gzip, deflate"},
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in stream.headers  # never gzip on an event stream
        snapshot = await stream.next_event()
        assert snapshot.event == "SESSION_SNAPSHOT"

        # Events the worker publishes: measured from the event's own id (the Redis time of the
        # XADD that the same script follows with PUBLISH) to its arrival here.
        worker_delays = []
        for n in range(4):
            await jobs.complete_photo_upload(session, f"p{n}")
            frame, arrived = await next_event_at(stream)
            assert frame.event == "PHOTO_UPLOADED"
            assert frame.json()["photoId"] == f"p{n}"
            worker_delays.append(arrived - event_time_ms(frame))

        # Payloads published straight to the channel (PROTOCOL §4): measured around the PUBLISH.
        publish_delays = []
        for n in range(5):
            payload = json.dumps({"type": "NGINX_PROBE", "n": n})
            published = time.time() * 1000
            assert await redis_client.publish(keys.session_channel(session), payload) >= 1
            frame, arrived = await next_event_at(stream)
            assert frame.event == "NGINX_PROBE"
            assert frame.json()["n"] == n
            publish_delays.append(arrived - published)

        assert max(worker_delays) < MAX_DELIVERY_MS, worker_delays
        assert max(publish_delays) < MAX_DELIVERY_MS, publish_delays

        # The last photo completes the session; the relay closes the stream after saying so.
        await jobs.complete_photo_upload(session, "p4")
        rest = await stream.until("STREAM_CLOSED")
        assert [f.event for f in rest] == ["PHOTO_UPLOADED", "SESSION_COMPLETED", "STREAM_CLOSED"]
        assert rest[-1].json()["reason"] == "completed"


async def test_notification_stream_through_nginx(
    stack: Stack, jobs: UploadJobsClient, redis_client: aioredis.Redis
) -> None:
    session, user = fresh("s"), fresh("u")
    async with open_sse(
        stack.nginx.url,
        "/api/upload/sessions/notifications/stream",
        token=stack.token(user),
        via="query",
    ) as stream:
        assert stream.status_code == 200
        await stream.next_frame()  # retry:, sent at once, so the subscription is in place
        await jobs.start_upload_session(session, user, total_photos=1)
        await jobs.complete_photo_upload(session, "p0")
        frame, arrived = await next_event_at(stream, within=15)
        assert frame.event == "notification"
        assert frame.json()["sessionId"] == session
        assert arrived - event_time_ms(frame) < MAX_DELIVERY_MS


async def test_killed_relay_client_resumes_on_the_other_through_nginx(
    stack: Stack, jobs: UploadJobsClient, redis_client: aioredis.Redis
) -> None:
    session, user = fresh("s"), fresh("u")
    total = 15
    path = f"/api/upload/sessions/{session}/stream"
    await jobs.start_upload_session(session, user, total_photos=total)
    await wait_for_state(redis_client, session, keys.STATE_STATUS, "IN_PROGRESS")

    received: list[SSEFrame] = []
    async with open_sse(stack.nginx.url, path, token=stack.token(user), via="query") as first:
        assert first.status_code == 200
        snapshot = await first.next_event()
        assert snapshot.event == "SESSION_SNAPSHOT"
        for n in range(5):
            await jobs.complete_photo_upload(session, f"p{n}")
            received.append(await first.next_event())

        # Which relay is carrying this stream? Its own metrics say.
        serving = [port for port in stack.relays if open_streams(port) >= 1]
        assert len(serving) == 1, "exactly one relay should hold the stream"
        (dead,) = serving
        (alive,) = [port for port in stack.relays if port != dead]
        stack.relays[dead].kill()  # SIGKILL: no STREAM_CLOSED, the connection just drops

        with pytest.raises(StreamEnded):
            await first.next_frame(timeout=10)

    # While the client is away, the worker goes on: these are only in the log now.
    for n in range(5, 10):
        await jobs.complete_photo_upload(session, f"p{n}")
    await wait_for_log_length(redis_client, session, 1 + 10)

    last_id = received[-1].id
    assert last_id is not None
    async with open_sse(
        stack.nginx.url, path, token=stack.token(user), via="query", last_event_id=last_id
    ) as second:
        assert second.status_code == 200
        replayed = await second.take(5)
        assert open_streams(alive) >= 1  # nginx sent the reconnection to the surviving relay
        for n in range(10, total):
            await jobs.complete_photo_upload(session, f"p{n}")
        rest = await second.until("STREAM_CLOSED", timeout=15)
    received += replayed + rest

    # Nothing lost, nothing twice, in log order: exactly the log after the snapshot's entry.
    entries = await redis_client.xrange(keys.session_log_key(session))
    assert entries is not None
    log = [entry_id for entry_id, _ in entries]
    assert snapshot.id is not None
    after_snapshot = log[log.index(snapshot.id) + 1 :]
    logged = [f for f in received if f.event != "STREAM_CLOSED"]
    assert [f.id for f in logged] == after_snapshot
    photos = [f.json()["photoId"] for f in logged if f.event == "PHOTO_UPLOADED"]
    # (jobs enqueued together may run in any order: the worker runs them concurrently)
    assert sorted(photos) == sorted(f"p{n}" for n in range(total))
    assert logged[-1].event == "SESSION_COMPLETED"
    assert received[-1].json()["reason"] == "completed"

    # Both requests were logged when they ended, with the token redacted from each.
    wait_until(
        lambda: stack.nginx.access_log().count(path) >= 2, timeout=10, what="both access log lines"
    )
    access = stack.nginx.access_log()
    assert "access_token=[redacted]" in access
    token = stack.token(user).split(".")
    for log_text in (access, stack.nginx.error_log()):
        for part in token[1:]:  # header.payload.signature: the payload and signature are unique
            assert part not in log_text
    assert "eyJ" not in access  # no JWT of any user
