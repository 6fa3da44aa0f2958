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

from rapidphoto_contract.events import Notification, SessionSnapshot
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.realtime import StateChange, StreamRefused, stream
from tests.e2e.conftest import (
    Cluster,
    LogEntry,
    Truth,
    as_frames,
    assert_exactly_the_log,
    drive,
    eventually,
    fresh,
    gather_bounded,
    opened,
    running,
    session_path,
    silent,
    supervised,
    take,
    to_the_end,
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
        stream(a.base_url, token=token, sessions=[session]) as on_a,
        stream(b.base_url, token=token, sessions=[session]) as on_b,
        stream(b.base_url, token=token, notifications=True) as notes,
    ):
        snapshots = [await take(on_a, 1), await take(on_b, 1)]
        await opened(notes)
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
        rests = await asyncio.gather(to_the_end(on_a, 45), to_the_end(on_b, 45))
        (note,) = await take(notes, 1)

    log = await truth.log(session)
    assert await truth.counts(session) == (photos, 0, "COMPLETED")
    uploads = collections.Counter(e.event["photoId"] for e in log if e.type == "PHOTO_UPLOADED")
    assert len(uploads) == photos
    assert set(uploads.values()) == {1}, "a photo's event was logged twice"
    assert [e.type for e in log[:1] + log[-1:]] == ["SESSION_STARTED", "SESSION_COMPLETED"]
    assert len(log) == photos + 2
    for name, snapshot, rest in zip(("a", "b"), snapshots, rests, strict=True):
        events = as_frames(snapshot + rest)
        assert events[0].event == "SESSION_SNAPSHOT", name
        assert_exactly_the_log(events[1:], log, after=events[0].id, client=name)
    assert isinstance(note, Notification)
    assert note.session_id == session
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
    """The product's client, given both relays, moves to b by itself when a dies, resuming with
    the last id it received: the events logged while it was away are replayed, none twice."""
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    relays = [a.base_url, b.base_url]
    user, warmup, session = fresh("u"), fresh("warmup"), fresh("s")
    token = cluster.token(user)
    photos = 60
    opens: list[str] = []

    def on_state(change: StateChange) -> None:
        if change.state == "open":
            opens.append(change.url)

    async with stream(relays, token=token, notifications=True) as notes:
        await opened(notes)
        await jobs.start_upload_session(warmup, user, total_photos=1)
        await jobs.complete_photo_upload(warmup, "p0")
        (first_note,) = await take(notes, 1)  # so the notification client has an id
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")
        async with (
            stream(relays, token=token, sessions=[session], on_state=on_state) as on_s,
            running(drive(jobs, session, photos, every=0.03)) as driver,
        ):
            cut = await take(on_s, 1 + 15)  # the snapshot and 15 live events
            a.proc.kill()
            await asyncio.wait_for(driver, 30)
            rest = await to_the_end(on_s)
            (note,) = await take(notes, 1)
            await silent(notes, 0.3)
    assert opens == relays
    log = await truth.log(session)
    assert len(log) == photos + 2
    await _resumed_ok(log, as_frames(cut), as_frames(rest), "client moved from a to b")
    assert isinstance(note, Notification)
    assert note.session_id == session
    assert isinstance(first_note, Notification)
    notifications = [n.id for n in await truth.notifications(user)]
    assert notifications == [first_note.event_id, note.event_id]
    print(f"cut after {len(cut) - 1} live events; {len(rest)} replayed or live on b")


async def test_sigterm_closes_every_stream_with_shutdown_within_5s_and_clients_resume_elsewhere(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    relays = [a.base_url, b.base_url]
    user, s1, s2, warmup = fresh("u"), fresh("s"), fresh("s"), fresh("warmup")
    token = cluster.token(user)
    photos = 50
    for session in (s1, s2):
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")
    #: When each client heard of the shutdown (its state report "reconnecting", "shutdown").
    shutdown_seen: dict[str, float] = {}

    def record(name: str) -> Callable[[StateChange], None]:
        def on_state(change: StateChange) -> None:
            if change.state == "reconnecting" and name not in shutdown_seen:
                assert change.reason == "shutdown", (name, change)
                shutdown_seen[name] = time.monotonic()

        return on_state

    async with (
        stream(relays, token=token, sessions=[s1], on_state=record(s1)) as one,
        stream(relays, token=token, sessions=[s2], on_state=record(s2)) as two,
        stream(relays, token=token, notifications=True, on_state=record("notes")) as notes,
    ):
        await opened(notes)
        # A notification first, so the notification client resumes from an id (a notification
        # published while it reconnects is replayed, not missed).
        await jobs.start_upload_session(warmup, user, total_photos=1)
        await jobs.complete_photo_upload(warmup, "p0")
        await take(notes, 1)
        async with (
            running(drive(jobs, s1, photos, every=0.03)) as d1,
            running(drive(jobs, s2, photos, every=0.03)) as d2,
        ):
            cut = {s1: await take(one, 1 + 10), s2: await take(two, 1 + 10)}
            started = time.monotonic()
            a.proc.signal(signal.SIGTERM)
            await asyncio.to_thread(a.proc.wait, 6)
            exited_in = time.monotonic() - started
            await eventually(_async(lambda: len(shutdown_seen) == 3), "every client told")
            closed_in = max(shutdown_seen.values()) - started
            assert closed_in < 5, f"streams closed {closed_in:.2f} s after SIGTERM"
            assert exited_in < 5, f"relay exited {exited_in:.2f} s after SIGTERM"
            assert a.proc.proc is not None
            # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
            assert a.proc.proc.returncode in (0, -signal.SIGTERM)

            # Each client resumes on b with the last id it received.
            await asyncio.wait_for(asyncio.gather(d1, d2), 30)
            rests = await asyncio.gather(to_the_end(one), to_the_end(two))
            notified = await take(notes, 2)
    assert {n.session_id for n in notified if isinstance(n, Notification)} == {s1, s2}
    for session, rest in zip((s1, s2), rests, strict=True):
        first = as_frames(cut[session])
        await _resumed_ok(await truth.log(session), first, as_frames(rest), f"{session} a->b")
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
    reconnections: list[StateChange] = []

    async def counted() -> bool:
        return await asyncio.to_thread(a.metric, "rapidphoto_relay_slow_consumer_closes_total") == 1

    async def read_stuck_once_closed() -> list[SSEFrame]:
        # The stuck client reads at last, once the relay gave up on it (and before the relay's
        # 10 s abort grace is over): what was buffered for it, a prefix of the log in order, then
        # the reason.
        await eventually(counted, "the slow-consumer close counted on relay a", within=60)
        return await asyncio.to_thread(stuck.read_to_end, 20)

    try:
        stuck_reading = asyncio.create_task(read_stuck_once_closed())
        async with (
            stream(
                a.base_url, token=token, sessions=[session], on_state=reconnections.append
            ) as fast_a,
            stream(
                b.base_url, token=token, sessions=[session], on_state=reconnections.append
            ) as fast_b,
        ):
            snapshots = [await take(fast_a, 1), await take(fast_b, 1)]
            # The fast clients read all along (their own buffer is bounded too); the 60 s for the
            # rest count from the last enqueue, below (the enqueues alone take long on 2 cores).
            reading = asyncio.gather(to_the_end(fast_a, 600), to_the_end(fast_b, 600))
            await gather_bounded(
                [
                    partial(jobs.fail_photo_upload, session, f"p{n:04d}-{'y' * 100}", reason)
                    for n in range(photos)
                ]
            )
            rests = await asyncio.wait_for(reading, 60)
        log = await truth.log(session)
        assert len(log) == photos + 2
        assert not [c for c in reconnections if c.state == "reconnecting"], reconnections
        for name, snapshot, rest in zip(("fast@a", "fast@b"), snapshots, rests, strict=True):
            events = as_frames(snapshot + rest)
            assert_exactly_the_log(events[1:], log, after=events[0].id, client=name)

        frames = await stuck_reading
    finally:
        stuck_reading.cancel()
        stuck.close()

    assert await counted()
    got, closed = _split_close(_events(frames))
    assert closed == "slow-consumer"
    assert got[0].event == "SESSION_SNAPSHOT"
    prefix = got[1:]
    assert len(prefix) < photos
    assert_exactly_the_log(prefix, log[: len(prefix) + 1], after=got[0].id, client="stuck")
    # It resumes (on the other relay) with the last id it got: exactly the rest.
    last = (prefix or got)[-1].id
    rest = await to_the_end(stream(b.base_url, token=token, sessions=[session], last_event_id=last))
    await _resumed_ok(log, got, as_frames(rest), "stuck client resumed")
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
        stream(a.base_url, token=token, sessions=[lost]) as lost_a,
        stream(b.base_url, token=token, sessions=[lost]) as lost_b,
        stream(a.base_url, token=token, notifications=True) as notes_a,
        stream(b.base_url, token=token, notifications=True) as notes_b,
    ):
        await take(lost_a, 1)
        await take(lost_b, 1)
        await opened(notes_a)
        await opened(notes_b)
        own_redis.kill()
        own_redis.start()  # empty
        for lost_stream in (lost_a, lost_b):
            with pytest.raises(StreamRefused) as refused:
                await to_the_end(lost_stream)
            assert (refused.value.reason, refused.value.status) == ("session-not-found", None)
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
            async with stream(b.base_url, token=token, sessions=[fresh_session]) as new:
                (snapshot,) = await take(new, 1)
                failed = await drive(jobs, fresh_session, 20, every=0.0)
                events = await to_the_end(new)
            log = await truth.log(fresh_session)
            notifications = await truth.notifications(user)
        (note_a,) = await take(notes_a, 1)
        (note_b,) = await take(notes_b, 1)
        await silent(notes_a, 0.3)
        await silent(notes_b, 0.3)
        # The notification streams never dropped: Redis' restart is the relay's business.
        assert (notes_a.state, notes_b.state) == ("open", "open")
    assert isinstance(snapshot, SessionSnapshot)
    assert snapshot.event_id == log[0].id
    assert_exactly_the_log(as_frames(events), log, after=snapshot.event_id, client="new session")
    assert await _counts(own_redis.url, fresh_session) == (20 - len(failed), len(failed))
    assert len(notifications) == 1
    for note in as_frames([note_a, note_b]):
        assert (note.id, note.data) == (notifications[0].id, notifications[0].data)
    print(f"Redis restarted empty; worker exit codes meanwhile: {exits}")


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A blocking check (HTTP) run in a thread, for :func:`eventually`."""
    return lambda: asyncio.to_thread(check)


async def _counts(redis_url: str, session_id: str) -> tuple[int, int]:
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
        uploaded, failed, _ = await Truth(client).counts(session_id)
    return uploaded, failed
