"""Faults, end to end: a real worker and two real relays, clients reading over HTTP, and then a
process dies, Redis restarts or a client stops reading. Each test holds every client to the
event log the worker wrote: every event once, in order, nothing lost, nothing repeated.

The relay-only versions of some of these (seeded state, one relay) are in tests/relay; here the
events come from the real worker through arq, and clients move between two relay instances.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import redis.asyncio as aioredis

from rapidphoto_tools.client import UploadJobsClient
from tests.e2e.conftest import (
    NOTIFICATION_STREAM,
    Cluster,
    LogEntry,
    Truth,
    assert_exactly_the_log,
    drive,
    eventually,
    fresh,
    gather_bounded,
    running,
    session_path,
    supervised,
    worker_outcomes,
)
from tests.support.redis_server import RedisServer
from tests.support.sse import FrameSplitter, SSEFrame, open_sse

pytestmark = pytest.mark.e2e

ClusterFactory = Callable[[str], Cluster]


def _events(frames: list[SSEFrame]) -> list[SSEFrame]:
    return [f for f in frames if f.is_event]


def _split_close(events: list[SSEFrame]) -> tuple[list[SSEFrame], str | None]:
    """(the events, the STREAM_CLOSED reason if the stream ended with one)."""
    if events and events[-1].event == "STREAM_CLOSED":
        return events[:-1], events[-1].json()["reason"]
    return events, None


def _ready(base_url: str) -> int:
    try:
        return httpx.get(base_url + "/health/ready", timeout=2).status_code
    except httpx.HTTPError:
        return 0


async def _resumed_ok(
    log: list[LogEntry], first: list[SSEFrame], second: list[SSEFrame], client: str
) -> None:
    """``first`` (snapshot + live, cut off) then ``second`` (resumed with the last id of
    ``first``) are together exactly the log: nothing lost, nothing repeated."""
    assert first[0].event == "SESSION_SNAPSHOT", client
    assert second, f"{client}: nothing after resuming"
    assert second[0].event != "SESSION_SNAPSHOT", f"{client}: resynchronised instead of resuming"
    assert_exactly_the_log(first[1:] + second, log, after=first[0].id, client=client)


# --- the worker ----------------------------------------------------------------------------------


async def test_worker_sigkilled_mid_run_counts_every_photo_once(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    session, user = fresh("s"), fresh("u")
    token = cluster.token(user)
    photos, duplicates = 300, 60
    await jobs.start_upload_session(session, user, total_photos=photos)
    await truth.wait_status(session, "IN_PROGRESS")

    async with (
        open_sse(a.base_url, session_path(session), token=token) as on_a,
        open_sse(b.base_url, session_path(session), token=token) as on_b,
        open_sse(b.base_url, NOTIFICATION_STREAM, token=token) as notes,
    ):
        await on_a.next_event()
        await on_b.next_event()
        await notes.next_frame()
        # Every job at once: the worker holds up to 50 at a time, so the kill catches some running.
        enqueued = await gather_bounded(
            [partial(jobs.complete_photo_upload, session, f"p{n}") for n in range(photos)]
        )
        await truth.wait_log_length(session, 1 + 40)
        first = cluster.workers[0]
        first.kill()
        killed_at = len(await truth.log(session)) - 1
        assert killed_at < photos, "the worker finished before it could be killed"
        # The pipeline delivers some jobs twice (at-least-once), some while no worker runs.
        enqueued += await gather_bounded(
            [partial(jobs.complete_photo_upload, session, f"p{n}") for n in range(duplicates)]
        )
        second = await asyncio.to_thread(cluster.start_worker)
        # Jobs the dead worker held run again once arq's in-progress marks expire
        # (job_timeout + 10 s = 20 s).
        await asyncio.gather(on_a.wait_ended(45), on_b.wait_ended(45))
        ends = [on_a.frames, on_b.frames]  # everything, from the snapshot on
        note = await notes.next_event(10)

    log = await truth.log(session)
    assert await truth.counts(session) == (photos, 0, "COMPLETED")
    uploads = collections.Counter(e.event["photoId"] for e in log if e.type == "PHOTO_UPLOADED")
    assert len(uploads) == photos
    assert set(uploads.values()) == {1}, "a photo's event was logged twice"
    assert [e.type for e in log[:1] + log[-1:]] == ["SESSION_STARTED", "SESSION_COMPLETED"]
    assert len(log) == photos + 2
    for name, frames in zip(("a", "b"), ends, strict=True):
        events, reason = _split_close(_events(frames))
        assert reason == "completed", name
        assert_exactly_the_log(events[1:], log, after=events[0].id, client=name)
    assert note.json()["sessionId"] == session
    assert len(await truth.notifications(user)) == 1

    # Nothing lost: every job has a result, the re-runs and duplicates changed nothing.
    results = [await job.result(timeout=30, poll_delay=0.1) for job in enqueued]
    assert len(results) == photos + duplicates
    outcomes = worker_outcomes(first) + worker_outcomes(second)
    applied = collections.Counter(
        o["photo_id"] for o in outcomes if o["outcome"] == "applied" and "photo_id" in o
    )
    # (A job the killed worker applied but never logged shows up once, as a duplicate re-run.)
    assert set(applied.values()) == {1}, "a photo was applied twice"
    rerun = [o for o in worker_outcomes(second) if o["try"] > 1]
    assert {o["outcome"] for o in rerun} <= {"applied", "duplicate"}
    print(
        f"worker killed after {killed_at}/{photos} photos; {len(rerun)} job(s) it held re-ran "
        f"after the restart ({sum(o['outcome'] == 'duplicate' for o in rerun)} already applied); "
        f"{duplicates} duplicates; every photo logged once"
    )


# --- a relay dies ------------------------------------------------------------------------------


async def test_relay_sigkilled_clients_resume_on_the_other_without_loss_or_repeat(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    user, warmup, session = fresh("u"), fresh("warmup"), fresh("s")
    token = cluster.token(user)
    photos = 60

    async with open_sse(a.base_url, NOTIFICATION_STREAM, token=token) as notes_a:
        await notes_a.next_frame()
        await jobs.start_upload_session(warmup, user, total_photos=1)
        await jobs.complete_photo_upload(warmup, "p0")
        first_note = await notes_a.next_event(10)  # so the notification client has an id
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")
        async with (
            open_sse(a.base_url, session_path(session), token=token) as on_a,
            running(drive(jobs, session, photos, every=0.03)) as driver,
        ):
            await on_a.take(1 + 15, 10)  # the snapshot and 15 live events
            a.proc.kill()
            await on_a.wait_ended(5)
            await notes_a.wait_ended(5)
            cut = on_a.events
            assert cut[-1].id is not None
            # Events go on being logged while the client is away; then it resumes on the other
            # relay with the last id it received.
            await truth.wait_log_length(session, len(cut) + 10)
            async with (
                open_sse(
                    b.base_url, session_path(session), token=token, last_event_id=cut[-1].id
                ) as on_b,
                open_sse(
                    b.base_url, NOTIFICATION_STREAM, token=token, last_event_id=first_note.id
                ) as notes_b,
            ):
                assert on_b.status_code == notes_b.status_code == 200
                await asyncio.wait_for(driver, 30)
                rest = _events(await on_b.wait_ended(20))
                note = await notes_b.next_event(10)
                await notes_b.expect_silence(0.3)
    after, reason = _split_close(rest)
    assert reason == "completed"
    log = await truth.log(session)
    assert len(log) == photos + 2
    await _resumed_ok(log, list(cut), after, "client moved from a to b")
    assert (note.event, note.json()["sessionId"]) == ("notification", session)
    assert [n.id for n in await truth.notifications(user)] == [first_note.id, note.id]
    print(f"cut after {len(cut) - 1} live events; {len(after)} replayed or live on b")


async def test_sigterm_closes_every_stream_with_shutdown_within_5s_and_clients_resume_elsewhere(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    user, s1, s2 = fresh("u"), fresh("s"), fresh("s")
    token = cluster.token(user)
    photos = 50
    for session in (s1, s2):
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")

    async with (
        open_sse(a.base_url, session_path(s1), token=token) as one,
        open_sse(a.base_url, session_path(s2), token=token, via="query") as two,
        open_sse(a.base_url, NOTIFICATION_STREAM, token=token) as notes,
        running(drive(jobs, s1, photos, every=0.03)) as d1,
        running(drive(jobs, s2, photos, every=0.03)) as d2,
    ):
        await notes.next_frame()
        await one.take(1 + 10, 10)
        await two.take(1 + 10, 10)
        started = time.monotonic()
        a.proc.signal(signal.SIGTERM)
        ended = await asyncio.gather(one.wait_ended(6), two.wait_ended(6), notes.wait_ended(6))
        closed_in = time.monotonic() - started
        await asyncio.to_thread(a.proc.wait, 6)
        exited_in = time.monotonic() - started
        for frames in ended:
            assert _events(frames)[-1].json() == {"type": "STREAM_CLOSED", "reason": "shutdown"}
        assert closed_in < 5, f"streams closed {closed_in:.2f} s after SIGTERM"
        assert exited_in < 5, f"relay exited {exited_in:.2f} s after SIGTERM"
        assert a.proc.proc is not None
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
        assert a.proc.proc.returncode in (0, -signal.SIGTERM)

        # Each client resumes on b with the last id it received.
        cut = {s1: _split_close(one.events)[0], s2: _split_close(two.events)[0]}
        async with (
            open_sse(b.base_url, session_path(s1), token=token, last_event_id=cut[s1][-1].id) as r1,
            open_sse(b.base_url, session_path(s2), token=token, last_event_id=cut[s2][-1].id) as r2,
            open_sse(b.base_url, NOTIFICATION_STREAM, token=token) as rn,
        ):
            await asyncio.wait_for(asyncio.gather(d1, d2), 30)
            rests = await asyncio.gather(r1.wait_ended(20), r2.wait_ended(20))
            notified = {(await rn.next_event(10)).json()["sessionId"] for _ in range(2)}
    assert notified == {s1, s2}
    for session, rest in zip((s1, s2), rests, strict=True):
        after, reason = _split_close(_events(rest))
        assert reason == "completed", session
        await _resumed_ok(await truth.log(session), cut[session], after, f"{session} a->b")
    print(
        f"SIGTERM: 3 streams closed in {closed_in * 1000:.0f} ms, "
        f"relay exited in {exited_in * 1000:.0f} ms"
    )


# --- a client that stops reading -----------------------------------------------------------------


async def test_client_that_stops_reading_is_closed_as_slow_consumer_and_others_unaffected(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    buffer = 100
    # The kernel takes up to ~4 MB for a client that stops reading before the relay's writer
    # blocks (the relay socket's send buffer grows to net.ipv4.tcp_wmem's max), then `buffer`
    # more events: ~1.4 KB events x 3,500 = ~5 MB are past that.
    photos = 3500
    cluster = cluster_factory(redis_url).start(
        relays=2,
        SSE_BUFFER_EVENTS=str(buffer),
        worker_env={"SESSION_LOG_MAXLEN": "10000"},  # keep the whole log, to compare with it
    )
    a, b = cluster.relays
    session, user = fresh("s"), fresh("u")
    token = cluster.token(user)
    reason = "unreadable EXIF block " + "x" * 1000
    await jobs.start_upload_session(session, user, total_photos=photos)
    await truth.wait_status(session, "IN_PROGRESS")

    stuck = StuckClient(a.port, session_path(session), token)
    try:
        async with (
            open_sse(a.base_url, session_path(session), token=token) as fast_a,
            open_sse(b.base_url, session_path(session), token=token) as fast_b,
        ):
            await fast_a.next_event()
            await fast_b.next_event()
            await gather_bounded(
                [
                    partial(jobs.fail_photo_upload, session, f"p{n:04d}-{'y' * 100}", reason)
                    for n in range(photos)
                ]
            )
            await asyncio.gather(fast_a.wait_ended(60), fast_b.wait_ended(60))
            ends = [fast_a.frames, fast_b.frames]  # everything, from the snapshot on
        log = await truth.log(session)
        assert len(log) == photos + 2
        for name, fast_frames in zip(("fast@a", "fast@b"), ends, strict=True):
            events, closed = _split_close(_events(fast_frames))
            assert closed == "completed", name
            assert_exactly_the_log(events[1:], log, after=events[0].id, client=name)

        # The stuck client reads at last (before the relay's 10 s abort grace is over): what was
        # buffered for it, a prefix of the log in order, then the reason.
        frames = await asyncio.to_thread(stuck.read_to_end, 20)
    finally:
        stuck.close()

    async def counted() -> bool:
        return a.metric("rapidphoto_relay_slow_consumer_closes_total") == 1

    await eventually(counted, "the slow-consumer close counted on relay a")
    got, closed = _split_close(_events(frames))
    assert closed == "slow-consumer"
    assert got[0].event == "SESSION_SNAPSHOT"
    prefix = got[1:]
    assert len(prefix) < photos
    assert_exactly_the_log(prefix, log[: len(prefix) + 1], after=got[0].id, client="stuck")
    # It resumes (on the other relay) with the last id it got: exactly the rest.
    last = (prefix or got)[-1].id
    async with open_sse(b.base_url, session_path(session), token=token, last_event_id=last) as r:
        rest, closed = _split_close(_events(await r.wait_ended(20)))
    assert closed == "completed"
    await _resumed_ok(log, got, rest, "stuck client resumed")
    assert b.metric("rapidphoto_relay_slow_consumer_closes_total") == 0
    print(
        f"stuck client got {len(prefix)}/{photos + 1} events before slow-consumer (buffer {buffer})"
    )


class StuckClient:
    """A client that sends its request and then reads nothing until told to: a plain blocking
    socket with a small receive buffer (an asyncio client would keep reading into user space)."""

    def __init__(self, port: int, path: str, token: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())

    def read_to_end(self, within: float) -> list[SSEFrame]:
        """Everything until the relay closes the connection, de-chunked, as frames."""
        self.sock.settimeout(within)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return FrameSplitter().feed(_dechunk(body))

    def close(self) -> None:
        self.sock.close()


def _dechunk(body: bytes) -> bytes:
    """HTTP/1.1 chunked transfer coding: ``<hex size>\\r\\n<bytes>\\r\\n`` ... ``0\\r\\n\\r\\n``."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


# --- Redis restarts ------------------------------------------------------------------------------


async def test_redis_restart_with_its_data_streams_survive_and_deliver_each_event_once(
    own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(own_redis.url).start(relays=2, SSE_HEARTBEAT_SECONDS="1")
    a, b = cluster.relays
    session, user = fresh("s"), fresh("u")
    token = cluster.token(user)
    photos = 40
    async with (
        UploadJobsClient.connect(own_redis.url) as jobs,
        aioredis.Redis.from_url(own_redis.url, decode_responses=True) as client,
    ):
        truth = Truth(client)
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")
        for n in range(10):
            await jobs.complete_photo_upload(session, f"before{n}")
        await truth.wait_counts(session, 10, 0)
        await client.save()  # this Redis keeps its data across the restart (like AOF would)

    # The worker exits when Redis goes away (rapidphoto-worker: "cannot reach Redis", exit 1); the
    # deployment's supervisor starts it again, and so does this test.
    async with (
        supervised(cluster) as exits,
        open_sse(a.base_url, session_path(session), token=token) as on_a,
        open_sse(b.base_url, session_path(session), token=token) as on_b,
    ):
        await on_a.next_event()
        await on_b.next_event()
        own_redis.kill()
        await eventually(_async(lambda: _ready(a.base_url) == 503), "relay a not ready")
        assert (await on_a.next_frame(3)).comments  # heartbeats while Redis is away
        own_redis.start()
        # Jobs right away: some are applied before the relays have resubscribed.
        async with UploadJobsClient.connect(own_redis.url) as jobs:
            for n in range(10, photos):
                await jobs.complete_photo_upload(session, f"after{n}")
            await asyncio.gather(on_a.wait_ended(30), on_b.wait_ended(30))
            ends = [on_a.frames, on_b.frames]  # everything, from the snapshot on
    async with aioredis.Redis.from_url(own_redis.url, decode_responses=True) as client:
        log = await Truth(client).log(session)
    assert len(log) == photos + 2
    for name, frames in zip(("a", "b"), ends, strict=True):
        events, closed = _split_close(_events(frames))
        assert closed == "completed", name
        assert events[0].id == log[10].id, name  # the snapshot, before the restart
        assert_exactly_the_log(events[1:], log, after=events[0].id, client=name)
    assert a.metric("rapidphoto_relay_redis_reconnects_total") >= 1
    assert b.metric("rapidphoto_relay_redis_reconnects_total") >= 1
    print(f"Redis restarted with its data; worker exit codes meanwhile: {exits}")


async def test_redis_restart_without_persistence_closes_lost_sessions_and_delivers_new_events_once(
    own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    """A Redis without persistence comes back empty: sessions it held are gone (PROTOCOL §5: their
    streams get STREAM_CLOSED session-not-found), the notification streams stay open, and every
    event logged after the restart reaches every one of them once."""
    cluster = cluster_factory(own_redis.url).start(relays=2, SSE_HEARTBEAT_SECONDS="1")
    a, b = cluster.relays
    lost, user = fresh("lost"), fresh("u")
    token = cluster.token(user)
    async with (
        UploadJobsClient.connect(own_redis.url) as jobs,
        aioredis.Redis.from_url(own_redis.url, decode_responses=True) as client,
    ):
        await jobs.start_upload_session(lost, user, total_photos=5)
        await jobs.complete_photo_upload(lost, "p0")
        await Truth(client).wait_counts(lost, 1, 0)

    async with (
        supervised(cluster) as exits,  # (see the test above)
        open_sse(a.base_url, session_path(lost), token=token) as lost_a,
        open_sse(b.base_url, session_path(lost), token=token) as lost_b,
        open_sse(a.base_url, NOTIFICATION_STREAM, token=token) as notes_a,
        open_sse(b.base_url, NOTIFICATION_STREAM, token=token) as notes_b,
    ):
        await lost_a.next_event()
        await lost_b.next_event()
        await notes_a.next_frame()
        await notes_b.next_frame()
        own_redis.kill()
        own_redis.start()  # empty
        for stream in (lost_a, lost_b):
            events = _events(await stream.wait_ended(20))
            assert events[-1].json() == {"type": "STREAM_CLOSED", "reason": "session-not-found"}
        await eventually(_async(lambda: _ready(a.base_url) == _ready(b.base_url) == 200), "ready")

        # New work after the restart: the worker is back on the new Redis, both relays deliver.
        fresh_session = fresh("s")
        async with (
            UploadJobsClient.connect(own_redis.url) as jobs,
            aioredis.Redis.from_url(own_redis.url, decode_responses=True) as client,
        ):
            truth = Truth(client)
            await jobs.start_upload_session(fresh_session, user, total_photos=20)
            await truth.wait_status(fresh_session, "IN_PROGRESS", within=30)
            async with open_sse(b.base_url, session_path(fresh_session), token=token) as new:
                snapshot = await new.next_event(10)
                failed = await drive(jobs, fresh_session, 20, every=0.0)
                events, closed = _split_close(_events(await new.wait_ended(20)))
            log = await truth.log(fresh_session)
            notifications = await truth.notifications(user)
        note_a = await notes_a.next_event(10)
        note_b = await notes_b.next_event(10)
        await notes_a.expect_silence(0.3)
        await notes_b.expect_silence(0.3)
    assert closed == "completed"
    assert snapshot.id == log[0].id
    assert_exactly_the_log(events, log, after=snapshot.id, client="new session stream")
    assert await _counts(own_redis.url, fresh_session) == (20 - len(failed), len(failed))
    assert len(notifications) == 1
    for note in (note_a, note_b):
        assert (note.id, note.data) == (notifications[0].id, notifications[0].data)
    print(f"Redis restarted empty; worker exit codes meanwhile: {exits}")


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A blocking check (HTTP) run in a thread, for :func:`eventually`."""
    return lambda: asyncio.to_thread(check)


async def _counts(redis_url: str, session_id: str) -> tuple[int, int]:
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
        uploaded, failed, _ = await Truth(client).counts(session_id)
    return uploaded, failed
