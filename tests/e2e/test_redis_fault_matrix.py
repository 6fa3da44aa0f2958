"""The Redis fault matrix (issue 9): one scenario, seven ways for Redis to misbehave under it.

Each test runs the same scenario on a private ``redis-server`` with real processes: a worker, two
relays, a steady flow of jobs on a few sessions from an upload pipeline that retries a refused
enqueue (with the same job id, so a retry never doubles a job), and on each relay one resuming client
per session: it reconnects with ``Last-Event-ID`` whenever its stream ends, and after a 503 waits the
``Retry-After`` it was given. While the flow runs, one fault hits Redis; from the fault's start a
prober opens a new stream on each relay every 100 ms.

What each test holds the product to (PROTOCOL §3, §5, §6):

- new stream requests: 200, or the documented 503 with ``Retry-After`` (≥ 1 s) and a JSON error
  only for a request made while Redis really was unusable (down, paused or refusing connections);
  after the fault, 200;
- open streams and clients that resume: every event of the session log (``XRANGE``) exactly once,
  in order, after the one snapshot they started with;
- jobs: every photo applied exactly once, none failed, the sessions completed;
- time to normal: from the fault's end to the first successful new stream on each relay, and to the
  first event logged after the fault reaching a client of each relay.

Each test prints its measurements as one ``FAULT-MATRIX {json}`` line (``pytest -s``), before its
assertions, so a failing fault is measured too. ``loadtests/fault_matrix.py`` runs this module and
prints the table of docs/operations.md ("Redis faults: what clients see").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.realtime import OtherEvent, StateChange, StreamRefused, stream
from tests.conftest import CPU_HEAVY
from tests.e2e.conftest import (
    Cluster,
    LogEntry,
    RelayInstance,
    Truth,
    assert_exactly_the_log,
    fresh,
    session_path,
    supervised,
    worker_outcomes,
)
from tests.support.redis_server import RedisServer
from tests.support.sse import SSEFrame

pytestmark = [pytest.mark.e2e, CPU_HEAVY]

ClusterFactory = Callable[[str], Cluster]
T = TypeVar("T")

#: The scenario's size: small, so the whole matrix stays around a minute.
SESSIONS = 3
PHOTOS = 10
#: Seconds between two enqueues of the pipeline (all sessions, round robin).
PACE = 0.04
#: The last rounds of photos are held until the fault is over, so that some events are logged
#: after it whatever its length (they time the recovery).
AFTER_FAULT_ROUNDS = 2
#: The fault hits once this many photo jobs are applied.
FAULT_AFTER_APPLIED = 6
#: How long the lasting faults (pause, maxclients, out of memory) last.
HOLD_SECONDS = 3.0
#: New-stream probes: one per relay this often, from the fault's start.
PROBE_EVERY = 0.1
#: Probing goes on this long after the fault (and until each relay answered a probe with 200).
PROBE_AFTER = 1.0
#: A stream that sends nothing (not even a heartbeat, every second here) this long is stalled.
STALL_SECONDS = 8.0
#: The relays' SSE_RETRY_MS: how long a resuming client waits before reconnecting.
RECONNECT_MS = 500
#: The whole scenario, fault included, must be over within this.
SCENARIO_SECONDS = 75.0


@dataclass(frozen=True)
class Fault:
    name: str
    #: Redis cannot serve requests for some of the fault (down, stopped, refusing connections):
    #: the only time a new stream may get 503.
    unusable: bool
    #: Redis keeps its data (everything but a restart without persistence).
    keeps_data: bool = True


FAULTS = [
    Fault("restart-with-data", unusable=True),
    Fault("restart-without-data", unusable=True, keeps_data=False),
    Fault("client-kill-pubsub", unusable=False),
    Fault("client-kill-normal", unusable=False),
    Fault("pause-3s", unusable=True),
    Fault("maxclients", unusable=True),
    Fault("out-of-memory", unusable=False),
]


# --- the fault ------------------------------------------------------------------------------------


async def _inflict(fault: Fault, server: RedisServer) -> tuple[float, float]:
    """Apply ``fault`` to ``server``; returns (start, end) wall-clock times. Lasting faults are
    undone before this returns."""
    async with aioredis.Redis.from_url(server.url, single_connection_client=True) as admin:
        await admin.ping()  # connected before the fault: maxclients must not lock the admin out
        start = time.time()
        if fault.name == "restart-with-data":
            # A planned restart: SHUTDOWN SAVE writes the data set and exits; it is loaded again
            # on start (the same --dir).
            await admin.shutdown(save=True)
            assert server.proc is not None
            await asyncio.to_thread(server.proc.wait, 20)
            server.proc = None
            await asyncio.to_thread(server.start)
        elif fault.name == "restart-without-data":
            await asyncio.to_thread(server.kill)  # SIGKILL; no persistence: it starts empty
            await asyncio.to_thread(server.start)
        elif fault.name == "client-kill-pubsub":
            await admin.client_kill_filter(_type="pubsub")
        elif fault.name == "client-kill-normal":
            # Every command connection but this one (skipme).
            await admin.client_kill_filter(_type="normal", skipme=True)
        elif fault.name == "pause-3s":
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(HOLD_SECONDS)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        elif fault.name == "maxclients":
            before = str(next(iter((await admin.config_get("maxclients")).values())))
            connected = int((await admin.info("clients"))["connected_clients"])
            await admin.config_set("maxclients", connected)  # nobody new gets in
            try:
                await asyncio.sleep(HOLD_SECONDS)
            finally:
                await admin.config_set("maxclients", before)
        elif fault.name == "out-of-memory":
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)  # every write refused: OOM
            try:
                await asyncio.sleep(HOLD_SECONDS)
            finally:
                await admin.config_set("maxmemory", 0)
        else:  # pragma: no cover
            raise AssertionError(fault.name)
        return start, time.time()


# --- clients --------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One request of a client: when it was made, what it got, how its stream ended."""

    at: float
    status: int
    retry_after: str | None = None
    body: str = ""
    ended: str = ""


@dataclass
class ResumingClient:
    """The product's client (``rapidphoto_tools.realtime``) following one session on one relay
    until the session is done: it resumes with ``Last-Event-ID`` whenever its stream ends and
    waits the ``Retry-After`` of a 503. Its state reports give the attempts measured here."""

    relay: RelayInstance
    session: str
    token: str
    #: (receive time, SSE id, event type, payload) of every event.
    events: list[tuple[float, str | None, str, str]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    end: str = ""

    @property
    def name(self) -> str:
        return f"{self.session}@{self.relay.name}"

    def _on_state(self, change: StateChange) -> None:
        attempt = self.attempts[-1]
        if change.state == "open":
            attempt.status = 200
        elif change.state == "reconnecting":
            reason = change.reason or ""
            if reason.startswith("HTTP "):
                attempt.status = int(reason.removeprefix("HTTP "))
            else:
                attempt.ended = reason.partition(":")[0]  # "connection lost: <detail>"
            # The next request goes out once the announced delay is over.
            self.attempts.append(Attempt(time.time() + (change.retry_in or 0.0), 0))

    async def run(self) -> None:
        self.attempts.append(Attempt(time.time(), 0))
        events = stream(
            self.relay.base_url,
            token=self.token,
            sessions=[self.session],
            on_state=self._on_state,
            idle_timeout=STALL_SECONDS,
        )
        try:
            async with events:
                async for event in events:
                    assert not isinstance(event, OtherEvent), event
                    self.events.append(
                        (time.time(), events.last_event_id, event.TYPE, event.to_json())
                    )
            self.end = self.attempts[-1].ended = "completed"
        except StreamRefused as refused:
            self.end = refused.reason if refused.status is None else f"refused {refused.status}"
            self.attempts[-1].ended = refused.reason

    def check(self, log: list[LogEntry]) -> None:
        """Every event of ``log`` after the first snapshot exactly once, in order (the typed
        events re-encoded: the contract's encoding is the worker's, byte for byte)."""
        frames = [
            SSEFrame(raw=b"", event=event, data=data, id=event_id)
            for _, event_id, event, data in self.events
        ]
        assert frames, f"{self.name}: no event at all"
        assert frames[0].event == "SESSION_SNAPSHOT", f"{self.name}: {frames[0].event} first"
        later = [f.id for f in frames[1:] if f.event == "SESSION_SNAPSHOT"]
        assert not later, f"{self.name}: resynchronised (snapshot) instead of resuming: {later}"
        assert_exactly_the_log(frames[1:], log, after=frames[0].id, client=self.name)


@dataclass
class Probe:
    relay: str
    at: float
    answered: float = 0.0
    status: int = 0
    retry_after: str | None = None
    body: str = ""


async def _probe_once(
    client: httpx.AsyncClient, relay: RelayInstance, path: str, probe: Probe
) -> None:
    try:
        async with client.stream("GET", relay.base_url + path) as response:
            probe.status = response.status_code
            probe.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                probe.body = (await response.aread()).decode(errors="replace")
    except httpx.HTTPError as exc:
        probe.body = f"{type(exc).__name__}: {exc}"
    probe.answered = time.time()


@contextlib.asynccontextmanager
async def probing(
    relays: list[RelayInstance], session: str, token: str
) -> AsyncIterator[tuple[list[Probe], asyncio.Event]]:
    """New streams on every relay every PROBE_EVERY s until the yielded event is set."""
    probes: list[Probe] = []
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    # One client for every probe: a new httpx client per request costs the test's event loop
    # tens of ms (an SSL context each), enough to skew what it measures on a busy machine.
    client = httpx.AsyncClient(
        headers={"Accept": "text/event-stream", "Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(10.0, read=10.0),
    )

    async def loop() -> None:
        while not stop.is_set():
            for relay in relays:
                in_flight = sum(1 for p in probes if p.relay == relay.name and not p.answered)
                if in_flight < 10:  # a stopped Redis must not pile up hundreds of requests
                    probe = Probe(relay.name, time.time())
                    probes.append(probe)
                    task = asyncio.create_task(
                        _probe_once(client, relay, session_path(session), probe)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY):
                    await stop.wait()

    looper = asyncio.create_task(loop())
    try:
        yield probes, stop
    finally:
        stop.set()
        await looper
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        await client.aclose()


# --- the pipeline ---------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """The upload pipeline: enqueues jobs, retrying a refused enqueue with the same job id."""

    redis_url: str
    enqueued: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)

    async def enqueue(self, jobs: UploadJobsClient, session: str, photo: str) -> None:
        while True:
            try:
                await jobs.complete_photo_upload(session, photo, job_id=f"{session}.{photo}")
                self.enqueued += 1
                return
            except (RedisError, OSError) as exc:
                self.refused[type(exc).__name__] += 1
                await asyncio.sleep(0.1)

    async def start(self, sessions: list[str], user: str) -> None:
        async with UploadJobsClient.connect(self.redis_url) as jobs:
            for session in sessions:
                await jobs.start_upload_session(
                    session, user, total_photos=PHOTOS, job_id=f"{session}.start"
                )

    async def flow(
        self, sessions: list[str], over: asyncio.Event, stop: asyncio.Event | None = None
    ) -> None:
        """Every photo of ``sessions``, round robin, one enqueue every PACE s; the last
        AFTER_FAULT_ROUNDS rounds once ``over`` is set."""
        async with UploadJobsClient.connect(self.redis_url) as jobs:
            for n in range(PHOTOS):
                if n == PHOTOS - AFTER_FAULT_ROUNDS:
                    await over.wait()
                for session in sessions:
                    if stop is not None and stop.is_set():
                        return
                    await self.enqueue(jobs, session, f"p{n:03d}")
                    await asyncio.sleep(PACE)


async def _tolerant(read: Awaitable[T]) -> T | None:
    """A Redis read that may fail while the fault lasts (None then)."""
    try:
        return await read
    except (RedisError, OSError):
        return None


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def _applied(truth: Truth, sessions: list[str]) -> int:
    total = 0
    for session in sessions:
        state = await _tolerant(truth.counts(session))
        total += 0 if state is None else state[0] + state[1]
    return total


# --- the scenario ---------------------------------------------------------------------------------


def _first_after(times: list[float], since: float) -> float | None:
    later = [t - since for t in times if t >= since]
    return round(min(later), 3) if later else None


async def run_scenario(
    fault: Fault, server: RedisServer, cluster: Cluster
) -> tuple[dict[str, Any], Callable[[], None]]:
    """Run the scenario with ``fault``; returns the measurements and a function asserting the
    rules of the module docstring (called after the measurements are printed)."""
    user, prober_user = fresh("u"), fresh("probe")
    token, probe_token = cluster.token(user), cluster.token(prober_user)
    sessions = [fresh("s") for _ in range(SESSIONS)]
    probe_session = fresh("probed")
    pipeline = Pipeline(server.url)
    client = _harness_client(server.url)
    truth = Truth(client)
    clients: list[ResumingClient] = []
    tasks: list[asyncio.Task[None]] = []

    def follow(some: list[str]) -> None:
        for relay in cluster.relays:
            for session in some:
                resuming = ResumingClient(relay, session, token)
                clients.append(resuming)
                tasks.append(asyncio.create_task(resuming.run()))

    try:
        await pipeline.start(sessions, user)
        async with UploadJobsClient.connect(server.url) as jobs:
            await jobs.start_upload_session(probe_session, prober_user, total_photos=1)
        for session in sessions:
            await truth.wait_status(session, "IN_PROGRESS")
        follow(sessions)
        stop_flow, fault_over = asyncio.Event(), asyncio.Event()
        flow = asyncio.create_task(pipeline.flow(sessions, fault_over, stop_flow))
        await _until(
            lambda: _count_at_least(truth, sessions, FAULT_AFTER_APPLIED),
            f"{FAULT_AFTER_APPLIED} photos applied",
            20,
        )
        before_logs: dict[str, list[LogEntry]] = {}
        if not fault.keeps_data:
            # What was logged before an empty restart cannot be read back afterwards: stop the
            # flow, let every client receive all of it, and keep it to compare with.
            stop_flow.set()
            await flow
            await _until(lambda: _drained(server.url), "the queue drained", 20)
            for session in sessions:
                before_logs[session] = await truth.log(session)
            await _until(
                lambda: _all_received(clients, before_logs), "clients caught up before", 20
            )
        async with probing(cluster.relays, probe_session, probe_token) as (probes, stop_probes):
            start, end = await _inflict(fault, server)
            fault_over.set()
            later_sessions: list[str] = []
            if not fault.keeps_data:
                # The pipeline goes on with new sessions on the empty Redis.
                later_sessions = [fresh("s") for _ in range(SESSIONS)]
                await pipeline.start(later_sessions, user)
                for session in later_sessions:
                    await _until(
                        partial(_status_is, truth, session, "IN_PROGRESS"), "started again", 20
                    )
                follow(later_sessions)
                flow = asyncio.create_task(pipeline.flow(later_sessions, fault_over))

            def settled() -> bool:
                answered = [p for p in probes if p.at >= end and p.status == 200]
                relays_ok = {p.relay for p in answered}
                return len(relays_ok) == len(cluster.relays) and time.time() >= end + PROBE_AFTER

            await _until(_sync(settled), "a new stream on each relay after the fault", 30)
            stop_probes.set()
        await asyncio.wait_for(flow, 40)
        done, _ = await asyncio.wait(tasks, timeout=40)
        stuck = [c.name for c, t in zip(clients, tasks, strict=True) if t not in done]
        logs = {s: await truth.log(s) for s in sessions + later_sessions}
        logs.update(before_logs)
        counts = {s: await truth.counts(s) for s in sessions + later_sessions}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()

    outcomes = [o for w in cluster.workers for o in worker_outcomes(w)]
    worker_lines = "\n".join(w.log() for w in cluster.workers)
    results = _measure(fault, start, end, probes, clients, outcomes, worker_lines, pipeline)
    results["stuck_clients"] = stuck

    def check() -> None:
        _check(fault, end, probes, clients, logs, counts, outcomes, stuck, sessions, later_sessions)

    return results, check


def _harness_client(redis_url: str) -> aioredis.Redis:
    """The test's own reads: a connection that Redis dropped is replaced at once. (redis-py's
    default backs off a second or more first, which would show up in the measured times.)"""
    return aioredis.Redis.from_url(
        redis_url,
        decode_responses=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 5),
    )


@contextlib.asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """The worst lateness of this test's event loop while the block runs (yielded list, filled at
    the end): the measured times are only as good as the loop that takes them."""
    worst = [0.0]

    async def watch() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            worst[0] = max(worst[0], time.monotonic() - before - 0.01)

    watcher = asyncio.create_task(watch())
    try:
        yield worst
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _sync(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


async def _count_at_least(truth: Truth, sessions: list[str], wanted: int) -> bool:
    return await _applied(truth, sessions) >= wanted


async def _status_is(truth: Truth, session: str, status: str) -> bool:
    counts = await _tolerant(truth.counts(session))
    return counts is not None and counts[2] == status


async def _drained(redis_url: str) -> bool:
    async with aioredis.Redis.from_url(redis_url) as client:
        queued = await client.zcard("arq:queue")
        running = [k async for k in client.scan_iter(match="arq:in-progress:*")]
    return queued == 0 and not running


async def _all_received(clients: list[ResumingClient], logs: dict[str, list[LogEntry]]) -> bool:
    for resuming in clients:
        newest = logs[resuming.session][-1].id
        if not any(event_id == newest for _, event_id, _, _ in resuming.events):
            return False
    return True


def _measure(
    fault: Fault,
    start: float,
    end: float,
    probes: list[Probe],
    clients: list[ResumingClient],
    outcomes: list[dict[str, Any]],
    worker_lines: str,
    pipeline: Pipeline,
) -> dict[str, Any]:
    relays = sorted({p.relay for p in probes})
    statuses = collections.Counter(str(p.status) for p in probes)
    refused = [p for p in probes if p.status != 200]
    reconnects = [a for c in clients for a in c.attempts[1:]]
    ended = collections.Counter(a.ended for c in clients for a in c.attempts if a.ended)
    retries = collections.Counter(o.get("reason", "?") for o in outcomes if o["outcome"] == "retry")
    return {
        "fault": fault.name,
        "fault_seconds": round(end - start, 3),
        "new_streams": {
            "probes": len(probes),
            "statuses": dict(statuses),
            "refused_after_fault": sum(1 for p in refused if p.at >= end),
            "retry_after": sorted({p.retry_after for p in refused if p.retry_after}),
            "bodies": sorted({p.body[:120] for p in refused}),
        },
        "open_streams": {
            "clients": len(clients),
            "stream_ends": dict(ended),
            "reconnects": len(reconnects),
            "reconnect_statuses": dict(collections.Counter(str(a.status) for a in reconnects)),
        },
        "jobs": {
            "enqueued": pipeline.enqueued,
            "enqueue_refusals": dict(pipeline.refused),
            "worker_retries": dict(retries),
            "worker_failed": sum(1 for o in outcomes if o["outcome"] == "failed"),
            "worker_restarts": worker_lines.count("lost Redis, restarting"),
        },
        "time_to_normal_s": {
            relay: {
                "first_new_stream": _first_after(
                    [
                        p.answered
                        for p in probes
                        if p.relay == relay and p.status == 200 and p.at >= end
                    ],
                    end,
                ),
                "first_new_event": _first_after(
                    [
                        at
                        for c in clients
                        if c.relay.name == relay
                        for at, event_id, _, _ in c.events
                        if event_id is not None and _id_seconds(event_id) >= end
                    ],
                    end,
                ),
            }
            for relay in relays
        },
    }


def _id_seconds(entry_id: str) -> float:
    return int(entry_id.partition("-")[0]) / 1000


def _check(
    fault: Fault,
    end: float,
    probes: list[Probe],
    clients: list[ResumingClient],
    logs: dict[str, list[LogEntry]],
    counts: dict[str, tuple[int, int, str]],
    outcomes: list[dict[str, Any]],
    stuck: list[str],
    sessions: list[str],
    later_sessions: list[str],
) -> None:
    assert not stuck, f"clients never finished: {stuck}"
    # New streams: 200, or 503 + Retry-After + JSON error only while Redis was unusable.
    for probe in probes:
        if probe.status == 200:
            continue
        when = f"{probe.at - end:+.2f} s from the fault's end"
        assert probe.status == 503, f"{probe.relay}: {probe.status} {probe.body!r} ({when})"
        usable = f"{probe.relay}: 503 while Redis was usable ({when}): {probe.body!r}"
        assert fault.unusable, usable
        assert probe.at < end, usable
        assert probe.retry_after is not None, probe
        assert int(probe.retry_after) >= 1, probe
        assert "error" in json.loads(probe.body), probe.body
    # Clients: the same rules for their reconnections; then every event once, in order.
    for resuming in clients:
        for attempt in resuming.attempts:
            if attempt.status in (200, 0):
                continue
            what = (
                f"{resuming.name}: {attempt.status} {attempt.body!r} "
                f"({attempt.at - end:+.2f} s from the fault's end)"
            )
            assert attempt.status == 503, what
            assert fault.unusable, what
            assert attempt.at < end, what
        if resuming.session in sessions and not fault.keeps_data:
            assert resuming.end == "session-not-found", resuming.name
        else:
            assert resuming.end == "completed", f"{resuming.name}: {resuming.end}"
        resuming.check(logs[resuming.session])
    # Jobs: every photo applied once, nothing failed, the sessions completed.
    assert not [o for o in outcomes if o["outcome"] == "failed"], "a job failed"
    finished = later_sessions if not fault.keeps_data else sessions
    for session in finished:
        assert counts[session] == (PHOTOS, 0, "COMPLETED"), (session, counts[session])
        photos = collections.Counter(
            e.event["photoId"] for e in logs[session] if e.type == "PHOTO_UPLOADED"
        )
        assert len(photos) == PHOTOS, (session, photos)
        assert set(photos.values()) == {1}, (session, photos)
    applied = collections.Counter(
        (o["session_id"], o["photo_id"])
        for o in outcomes
        if o["outcome"] == "applied" and "photo_id" in o
    )
    doubled = [k for k, n in applied.items() if n > 1]
    assert not doubled, f"applied twice: {doubled}"


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_redis_fault(
    fault: Fault, own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    cluster = cluster_factory(own_redis.url).start(
        relays=2, SSE_HEARTBEAT_SECONDS="1", SSE_RETRY_MS=str(RECONNECT_MS)
    )
    began = time.monotonic()
    async with (
        supervised(cluster) as exits,
        loop_lag() as lag,
        asyncio.timeout(SCENARIO_SECONDS),
    ):
        results, check = await run_scenario(fault, own_redis, cluster)
    results["jobs"]["worker_exits"] = exits
    results["harness"] = {
        "scenario_s": round(time.monotonic() - began, 1),
        "max_loop_lag_s": round(lag[0], 3),
    }
    print(f"\nFAULT-MATRIX {json.dumps(results, sort_keys=True)}")
    check()
