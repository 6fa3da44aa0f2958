"""The whole product on a Redis Cluster (PROTOCOL §9), real processes: a local 3-master/3-replica
cluster, a standalone queue Redis, two workers (``REDIS_WAIT_REPLICAS=1``) and two relays in
cluster mode, sessions spread over every master, and the product's client on each session on
both relays. One cluster for the module; the tests that break a master run last.

Each fault test holds every client to the log: every event exactly once, in order, byte for byte
(what it missed live comes from the log, PROTOCOL §5), measures how long the streams of the
master at fault stayed without events, and checks that the streams of the other masters never
paused (their longest gap between events is reported and bounded).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from rapidphoto_contract import keys
from rapidphoto_contract.events import Notification, SessionSnapshot
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.realtime import EventStream, OtherEvent, StreamEvent, stream
from rapidphoto_worker import commands
from tests.conftest import CPU_HEAVY
from tests.e2e.conftest import (
    Cluster,
    LogEntry,
    as_frames,
    assert_exactly_the_log,
    eventually,
    opened,
)
from tests.support.redis_cluster import RedisClusterNodes, migrate_slot, redis_cluster
from tests.support.redis_server import RedisServer
from tests.support.worker import worker_context, worker_settings

# CPU_HEAVY: the failover and resharding tests time the streams' gaps (< 1.5 s); beside another
# CPU-heavy module on the other xdist worker they failed at a load average of ~8.
pytestmark = [pytest.mark.e2e, CPU_HEAVY]

USER = "cluster-user"
#: Photos per session, and the pace of each session's jobs (events per second per session).
PHOTOS = 60
EVERY = 0.05
#: A stream of a healthy master gets an event every EVERY seconds; a pause would be a resync or a
#: reconnection (seconds: a fail-over's promotion alone takes 2-3 s). What is left above EVERY is
#: scheduling on a loaded 2-core test machine (measured: 0.1-0.3 s idle, up to 1 s loaded).
HEALTHY_GAP_SECONDS = 1.5
#: PROTOCOL §9 asks a fail-over's streams to resume within 5 s of the promotion, the issue within
#: 1 s for CLUSTER FAILOVER: measured 0.2-0.9 s (the printed figures); bounded here with the same
#: allowance for a loaded machine as above.
FAILOVER_RESUME_SECONDS = 1.5


@dataclass
class Stack:
    nodes: RedisClusterNodes
    queue_url: str
    processes: Cluster

    @property
    def relay_urls(self) -> list[str]:
        return [r.base_url for r in self.processes.relays]

    def cluster_client(self) -> aioredis.RedisCluster:
        return aioredis.RedisCluster(
            host="127.0.0.1", port=self.nodes.live_ports()[0], decode_responses=True
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir: Path = tmp_path_factory.mktemp("cluster-logs")
    queue = RedisServer()
    queue.start()
    try:
        with redis_cluster() as nodes:
            env = {"REDIS_CLUSTER": "1", "QUEUE_REDIS_URL": queue.url}
            processes = Cluster(nodes.url, log_dir, worker_env={**env, "REDIS_WAIT_REPLICAS": "1"})
            try:
                processes.start(relays=2, REDIS_CLUSTER="1", QUEUE_REDIS_URL=queue.url)
                processes.start_worker()  # a second worker
                yield Stack(nodes, queue.url, processes)
            finally:
                processes.stop()
    finally:
        queue.stop()


@pytest.fixture
async def jobs(stack: Stack) -> AsyncIterator[UploadJobsClient]:
    async with UploadJobsClient.connect(stack.queue_url) as client:
        yield client


def sessions_per_master(stack: Stack, prefix: str, each: int = 1) -> dict[int, list[str]]:
    """``each`` fresh session ids on every master (by their slot's owner now)."""
    found: dict[int, list[str]] = {port: [] for port in stack.nodes.masters()}
    n = 0
    stamp = f"{prefix}-{time.monotonic_ns() % 10**9}"
    while any(len(v) < each for v in found.values()):
        sid = f"{stamp}-{n}"
        owner = stack.nodes.owner_of(keys.session_channel(sid))
        if len(found.get(owner, [each])) < each:
            found[owner].append(sid)
        n += 1
    return found


@dataclass
class Watcher:
    """The product's client on one session, recording each event and when it came."""

    session_id: str
    relay: str
    events: list[StreamEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stream: EventStream | None = None

    async def run(self, token: str, relays: list[str]) -> None:
        # Its relay first; the other one when it reconnects.
        order = [self.relay, *(r for r in relays if r != self.relay)]
        self.stream = stream(order, token=token, sessions=[self.session_id], max_backoff=0.5)
        async with self.stream as events:
            async for event in events:
                self.events.append(event)
                self.times.append(time.monotonic())

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time without an event between ``since`` and ``until``, or the stream's
        end if it ended before (a finished session is not a paused stream)."""
        end = min(until, self.times[-1]) if self.times else until
        marks = [since, *(t for t in self.times if since <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(marks))


async def watch(stack: Stack, sessions: list[str]) -> list[Watcher]:
    token = stack.processes.token(USER)
    watchers = [
        Watcher(sid, relay) for sid in sessions for relay in stack.relay_urls
    ]  # every session on both relays
    for w in watchers:
        w.task = asyncio.create_task(w.run(token, stack.relay_urls))
    return watchers


async def drive(jobs: UploadJobsClient, sid: str) -> None:
    for n in range(PHOTOS):
        await jobs.complete_photo_upload(sid, f"p{n}")
        await asyncio.sleep(EVERY)


async def log_of(stack: Stack, sid: str) -> list[LogEntry]:
    async with stack.cluster_client() as client:
        raw: list[tuple[str, dict[str, str]]] = await client.xrange(keys.session_log_key(sid))  # type: ignore[assignment]
    return [LogEntry(i, f[keys.LOG_FIELD_DATA]) for i, f in raw]


async def finish(stack: Stack, watchers: list[Watcher], sessions: list[str]) -> None:
    """Every client ends (the session completed) with exactly its log."""
    for w in watchers:
        assert w.task is not None
        await asyncio.wait_for(w.task, 60)
    for sid in sessions:
        log = await log_of(stack, sid)
        assert len([e for e in log if e.type == "PHOTO_UPLOADED"]) == PHOTOS, sid
        for w in (w for w in watchers if w.session_id == sid):
            # It opened without Last-Event-ID: a snapshot, then every event after it, once each,
            # in order, however many times it resumed; never another snapshot.
            snapshot, *rest = w.events
            assert isinstance(snapshot, SessionSnapshot), snapshot
            frames = as_frames(rest)
            assert "SESSION_SNAPSHOT" not in [f.event for f in frames], f"{sid}: resynchronised"
            assert_exactly_the_log(frames, log, after=snapshot.event_id, client=f"{sid}@{w.relay}")


async def started(stack: Stack, jobs: UploadJobsClient, sessions: list[str]) -> None:
    for sid in sessions:
        await jobs.start_upload_session(sid, USER, PHOTOS)
    async with stack.cluster_client() as client:

        async def all_started() -> bool:
            for sid in sessions:
                if not await client.exists(keys.session_state_key(sid)):
                    return False
            return True

        await eventually(all_started, "every session started")


async def test_a_third_party_spublish_reaches_the_streams_on_every_master(
    stack: Stack, jobs: UploadJobsClient
) -> None:
    """PROTOCOL §4, §9: other backends integrate with SPUBLISH on the channel's name."""
    sessions = [s for ss in sessions_per_master(stack, "third").values() for s in ss]
    await started(stack, jobs, sessions)
    token = stack.processes.token(USER)
    for sid in sessions:
        async with stream(stack.relay_urls[0], token=token, sessions=[sid]) as events:
            first = await asyncio.wait_for(anext(events), 10)  # the snapshot: subscribed by now
            assert isinstance(first, SessionSnapshot)
            async with stack.cluster_client() as client:
                await client.execute_command(
                    "SPUBLISH", keys.session_channel(sid), json.dumps({"type": "EXTERNAL", "n": 1})
                )
            got = await asyncio.wait_for(anext(events), 10)
            assert isinstance(got, OtherEvent)
            assert got.payload == {"type": "EXTERNAL", "n": 1}


async def test_a_worker_killed_between_the_completion_steps_notifies_once(
    stack: Stack, jobs: UploadJobsClient
) -> None:
    """The completing job's first step ran (as a worker SIGKILLed right after it leaves things),
    the job is still queued: the workers run it again, and the owner gets one notification, on
    the notification stream of either relay."""
    sid = next(iter(sessions_per_master(stack, "notify").values()))[0]
    user = f"notify-{sid}"
    await jobs.start_upload_session(sid, user, 1)
    token = stack.processes.token(user)
    async with stream(stack.relay_urls[1], token=token, notifications=True) as notes:
        # Open (subscribed) before the notification can be written: a notification stream opened
        # without Last-Event-ID starts live.
        await opened(notes)
        settings = worker_settings(
            stack.nodes.url, redis_cluster=True, queue_redis_url=stack.queue_url
        )
        async with worker_context(settings) as app:
            await eventually(lambda: _exists(stack, keys.session_state_key(sid)), "session started")
            reply = await app.state.run(
                app.scripts.complete_photo_upload,
                keys.session_keys(sid),
                [
                    app.state.publish,
                    sid,
                    "p1",
                    commands.occurred_at(),
                    1000,
                    3600,
                    keys.session_channel(sid),
                ],
            )
            assert reply[0] == "applied"
            assert reply[2]  # the notification is pending
        # The job the dead worker held, run again by a live worker: a duplicate that finishes it.
        job = await jobs.complete_photo_upload(sid, "p1")
        assert (await job.result(timeout=20))["outcome"] == "duplicate"
        first = await asyncio.wait_for(anext(notes), 10)
        assert isinstance(first, Notification)
        assert first.session_id == sid
        again = await jobs.complete_photo_upload(sid, "p1")  # once more: nothing new
        assert (await again.result(timeout=20))["outcome"] == "duplicate"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(notes), 1.0)
    async with stack.cluster_client() as client:
        assert await client.xlen(keys.user_notifications_log_key(user)) == 1


async def _exists(stack: Stack, key: str) -> bool:
    async with stack.cluster_client() as client:
        return bool(await client.exists(key))


async def _under_load(
    stack: Stack, jobs: UploadJobsClient, prefix: str, fault: Any
) -> tuple[dict[int, list[str]], list[Watcher], float, float]:
    """Sessions on every master with clients on both relays, jobs flowing; ``fault()`` (returning
    the master at fault) half way. Returns the layout, the watchers, and when the fault began and
    ended (the streams of the master at fault resynced)."""
    layout = sessions_per_master(stack, prefix)
    sessions = [s for ss in layout.values() for s in ss]
    await started(stack, jobs, sessions)
    watchers = await watch(stack, sessions)
    drivers = [asyncio.create_task(drive(jobs, sid)) for sid in sessions]
    await asyncio.sleep(PHOTOS * EVERY / 3)
    began = time.monotonic()
    await fault()
    ended = time.monotonic()
    await asyncio.gather(*drivers)
    await finish(stack, watchers, sessions)
    return layout, watchers, began, ended


def gaps(
    layout: dict[int, list[str]], watchers: list[Watcher], victim: int, began: float, until: float
) -> tuple[float, float]:
    """The longest gap of the victim's streams, and of the others', between began and until."""
    mine = [w.longest_gap(began, until) for w in watchers if w.session_id in layout[victim]]
    others = [w.longest_gap(began, until) for w in watchers if w.session_id not in layout[victim]]
    return max(mine), max(others)


async def test_a_cluster_failover_resumes_its_streams_within_a_second_and_pauses_no_other(
    stack: Stack, jobs: UploadJobsClient
) -> None:
    victim = 0

    async def failover() -> int:
        nonlocal victim
        victim = stack.nodes.masters()[0]
        replica = stack.nodes.replica_of(victim)
        await asyncio.to_thread(stack.nodes.client(replica).execute_command, "CLUSTER", "FAILOVER")
        await asyncio.to_thread(stack.nodes.wait_master, replica)
        return victim

    layout, watchers, began, _ = await _under_load(stack, jobs, "failover", failover)
    mine, others = gaps(layout, watchers, victim, began, began + PHOTOS * EVERY / 2)
    print(f"CLUSTER FAILOVER: its streams' longest gap {mine:.3f} s, the others' {others:.3f} s")
    assert mine < FAILOVER_RESUME_SECONDS
    assert others < HEALTHY_GAP_SECONDS


async def test_a_busy_slot_resharded_to_another_master_keeps_its_streams(
    stack: Stack, jobs: UploadJobsClient
) -> None:
    """The slot of a session with jobs flowing moves (CLUSTER SETSLOT / MIGRATE, as redis-cli's
    reshard does): its streams follow it, the others never pause."""
    layout = sessions_per_master(stack, "reshard")
    sessions = [s for ss in layout.values() for s in ss]
    victim = sorted(layout)[0]
    target = next(p for p in stack.nodes.masters() if p != victim)
    await started(stack, jobs, sessions)
    watchers = await watch(stack, sessions)
    drivers = [asyncio.create_task(drive(jobs, sid)) for sid in sessions]
    await asyncio.sleep(PHOTOS * EVERY / 3)
    began = time.monotonic()
    sid = layout[victim][0]
    steps = migrate_slot(stack.nodes, key_slot(keys.session_channel(sid).encode()), victim, target)
    await asyncio.to_thread(steps.run)
    await asyncio.gather(*drivers)
    await finish(stack, watchers, sessions)
    assert stack.nodes.owner_of(keys.session_channel(sid)) == target
    mine, others = gaps(layout, watchers, victim, began, began + PHOTOS * EVERY / 2)
    print(f"resharding: the moved streams' longest gap {mine:.3f} s, the others' {others:.3f} s")
    assert mine < FAILOVER_RESUME_SECONDS
    assert others < HEALTHY_GAP_SECONDS


async def test_a_master_killed_under_load_loses_no_event_of_a_finished_job(
    stack: Stack, jobs: UploadJobsClient
) -> None:
    """Runs last: the module's cluster is left with a master fewer. REDIS_WAIT_REPLICAS=1: every
    job that succeeded has its event in the log (finish() holds each session's log to all of its
    photos, each once) and every client on either relay ends with every event once, in order."""
    victim = 0

    async def kill() -> int:
        nonlocal victim
        victim = stack.nodes.masters()[0]
        replica = stack.nodes.replica_of(victim)
        await asyncio.to_thread(stack.nodes.kill, victim)
        await asyncio.to_thread(stack.nodes.wait_master, replica)
        return victim

    layout, watchers, began, promoted = await _under_load(stack, jobs, "kill", kill)
    mine, others = gaps(layout, watchers, victim, began, began + 10)
    print(
        f"SIGKILL: promotion after {promoted - began:.3f} s; its streams' longest gap "
        f"{mine:.3f} s, the others' {others:.3f} s"
    )
    assert others < HEALTHY_GAP_SECONDS
    # PROTOCOL §9: live again within 5 s of the promotion (the gap began at the kill).
    assert mine - (promoted - began) < 5.0
