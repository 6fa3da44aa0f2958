"""End-to-end fixtures: real ``rapidphoto-worker`` and ``rapidphoto-relay`` processes on a real Redis.

:class:`Cluster` starts a worker and relays (in parallel: each process takes a few seconds to import),
restarts a relay on its own port after a crash, and tears everything down. :class:`Truth` reads
what the worker wrote (state, photos, event logs): the ground truth every client is held to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from playwright.async_api import Browser, BrowserContext

from rapidphoto_contract import keys
from rapidphoto_contract.tokens import mint_token
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.realtime import EventStream, OtherEvent, StreamEvent
from tests.conftest import TEST_SECRET
from tests.support.browser import launched_chromium
from tests.support.processes import ManagedProcess, start_relay, start_worker, wait_until
from tests.support.redis_server import free_port, private_redis
from tests.support.sse import SSEFrame

T = TypeVar("T")

#: The worker logs this once its Redis client and scripts are in place (rapidphoto_worker.main).
WORKER_READY_LINE = '"worker ready"'
SESSION_STREAM = "/api/upload/sessions/{}/stream"
NOTIFICATION_STREAM = "/api/upload/sessions/notifications/stream"


def fresh(prefix: str) -> str:
    """A new id, so tests sharing a Redis server never see each other's sessions or channels."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def session_path(session_id: str) -> str:
    return SESSION_STREAM.format(session_id)


@dataclass
class RelayInstance:
    name: str
    port: int
    proc: ManagedProcess
    env: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the relay's /metrics (0 when absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        text = httpx.get(self.base_url + "/metrics", timeout=5).text
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if not line.startswith("#") and key == wanted:
                return float(value)
        return 0.0

    def open_streams(self) -> float:
        text = httpx.get(self.base_url + "/metrics", timeout=5).text
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("rapidphoto_relay_open_streams{")
        )


@dataclass
class Cluster:
    """A worker and relays on ``redis_url``; everything started is stopped by the fixture."""

    redis_url: str
    log_dir: Path
    relays: list[RelayInstance] = field(default_factory=list)
    workers: list[ManagedProcess] = field(default_factory=list)
    #: Settings for every worker this cluster starts (e.g. SESSION_LOG_MAXLEN).
    worker_env: dict[str, str] = field(default_factory=dict)
    _started: list[ManagedProcess] = field(default_factory=list)
    _names: int = 0

    def token(self, user_id: str, ttl: float = 3600) -> str:
        return mint_token(user_id, key=TEST_SECRET, ttl_seconds=ttl)

    def _name(self, kind: str) -> str:
        self._names += 1
        return f"{kind}-{self._names}"

    def start_worker(self, **env: str) -> ManagedProcess:
        env = {**self.worker_env, **env}
        worker = start_worker(self.redis_url, self.log_dir, name=self._name("worker"), **env)
        self._started.append(worker)

        def ready() -> bool:
            if not worker.running():
                raise RuntimeError(f"{worker.name} exited early:\n{worker.log()}")
            return WORKER_READY_LINE in worker.log()

        wait_until(ready, timeout=30, interval=0.05, what=f"{worker.name} ready")
        self.workers.append(worker)
        return worker

    def restart_exited_workers(self, wanted: int) -> list[int]:
        """Start workers until ``wanted`` run; returns the exit codes of those that had exited.
        Raises ``RuntimeError`` when a new one exits at once (e.g. Redis is still down)."""
        codes = []
        for worker in [w for w in self.workers if not w.running()]:
            assert worker.proc is not None
            codes.append(worker.proc.returncode)
            self.workers.remove(worker)
        while len(self.workers) < wanted:
            self.start_worker()
        return codes

    def _start_relay(self, name: str, port: int, env: dict[str, str]) -> RelayInstance:
        # (cast: start_relay's own keyword ``ready`` is a bool, every other one a setting)
        settings = cast("dict[str, Any]", env)
        proc = start_relay(self.redis_url, port, self.log_dir, name=name, **settings)
        self._started.append(proc)
        return RelayInstance(name, port, proc, env)

    def start(
        self,
        *,
        relays: int = 2,
        worker: bool = True,
        each: list[dict[str, str]] | None = None,
        worker_env: dict[str, str] | None = None,
        **env: str,
    ) -> Cluster:
        """Start ``relays`` relays (settings ``env``, plus ``each[i]`` for the i-th) and a
        worker (settings ``worker_env``), all at once."""
        self.worker_env.update(worker_env or {})
        each = each or [{} for _ in range(relays)]
        assert len(each) == relays
        with ThreadPoolExecutor(relays + 1) as pool:
            futures = [
                pool.submit(
                    self._start_relay,
                    self._name("relay"),
                    free_port(),
                    {"JWT_SECRET": TEST_SECRET, **env, **extra},
                )
                for extra in each
            ]
            worker_future = pool.submit(self.start_worker) if worker else None
            self.relays.extend(f.result() for f in futures)
            if worker_future is not None:
                worker_future.result()
        return self

    def restart_relay(self, relay: RelayInstance) -> RelayInstance:
        """Start ``relay`` again on its port (after a kill or a shutdown); same settings."""
        assert not relay.proc.running(), f"{relay.name} is still running"
        again = self._start_relay(f"{relay.name}-again", relay.port, relay.env)
        self.relays[self.relays.index(relay)] = again
        return again

    def stop(self) -> None:
        for proc in reversed(self._started):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in self._started)


@pytest.fixture
def cluster_factory(log_dir: Path) -> Iterator[Callable[[str], Cluster]]:
    clusters: list[Cluster] = []

    def make(redis_url: str) -> Cluster:
        cluster = Cluster(redis_url, log_dir)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


# --- one stack and one browser per test module (the browser tests) ----------------------------
# A module marked ``pytest.mark.asyncio(loop_scope="module")`` shares one event loop, so a browser
# (and the Redis clients of each test) can outlive one test. Each test still gets a fresh browser
# context and makes fresh users and sessions: the tests stay independent.


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture(scope="module")
def module_cluster_factory(
    tmp_path_factory: pytest.TempPathFactory, module_redis_url: str
) -> Iterator[Callable[[], Cluster]]:
    clusters: list[Cluster] = []

    def make() -> Cluster:
        cluster = Cluster(module_redis_url, tmp_path_factory.mktemp("logs"))
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium_browser() -> AsyncIterator[Browser]:
    async with launched_chromium() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium_browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context of the module's browser: no cookies, no cache, no open page."""
    context = await chromium_browser.new_context(viewport={"width": 1000, "height": 900})
    try:
        yield context
    finally:
        await context.close()


@pytest_asyncio.fixture(loop_scope="module")
async def module_jobs(module_redis_url: str) -> AsyncIterator[UploadJobsClient]:
    async with UploadJobsClient.connect(module_redis_url) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def module_truth(module_redis_url: str) -> AsyncIterator[Truth]:
    client = aioredis.Redis.from_url(module_redis_url, decode_responses=True)
    try:
        yield Truth(client)
    finally:
        await client.aclose()


@pytest.fixture
async def jobs(redis_url: str) -> AsyncIterator[UploadJobsClient]:
    async with UploadJobsClient.connect(redis_url) as client:
        yield client


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = 15.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


@dataclass(frozen=True)
class LogEntry:
    id: str
    data: str

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed

    @property
    def type(self) -> str:
        return str(self.event["type"])


class Truth:
    """What the worker wrote in Redis, read directly."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def _entries(self, key: str) -> list[LogEntry]:
        raw: list[tuple[str, dict[str, str]]] = await self.redis.xrange(key)  # type: ignore[assignment]
        return [LogEntry(entry_id, fields[keys.LOG_FIELD_DATA]) for entry_id, fields in raw]

    async def log(self, session_id: str) -> list[LogEntry]:
        return await self._entries(keys.session_log_key(session_id))

    async def notifications(self, user_id: str) -> list[LogEntry]:
        return await self._entries(keys.user_notifications_log_key(user_id))

    async def state(self, session_id: str) -> dict[str, str]:
        state: dict[str, str] = await self.redis.hgetall(keys.session_state_key(session_id))  # type: ignore[assignment]
        return state

    async def counts(self, session_id: str) -> tuple[int, int, str]:
        """``(uploaded, failed, status)``; ``(0, 0, "")`` before the session exists."""
        state = await self.state(session_id)
        return (
            int(state.get(keys.STATE_UPLOADED, 0)),
            int(state.get(keys.STATE_FAILED, 0)),
            state.get(keys.STATE_STATUS, ""),
        )

    async def failures(self, session_id: str) -> dict[str, str]:
        """Photos failed now, with their reasons (from the photos hash)."""
        photos: dict[str, str] = await self.redis.hgetall(keys.session_photos_key(session_id))  # type: ignore[assignment]
        prefix = keys.PHOTO_FAILED_PREFIX
        return {p: mark[len(prefix) :] for p, mark in photos.items() if mark.startswith(prefix)}

    async def wait_counts(
        self, session_id: str, uploaded: int, failed: int, within: float = 20.0
    ) -> None:
        async def reached() -> bool:
            got = await self.counts(session_id)
            return got[0] == uploaded and got[1] == failed

        await eventually(reached, f"{session_id}: {uploaded} uploaded, {failed} failed", within)

    async def wait_status(self, session_id: str, status: str, within: float = 20.0) -> None:
        async def reached() -> bool:
            return (await self.counts(session_id))[2] == status

        await eventually(reached, f"{session_id}: status {status}", within)

    async def wait_log_length(self, session_id: str, length: int, within: float = 20.0) -> None:
        async def reached() -> bool:
            return int(await self.redis.xlen(keys.session_log_key(session_id))) >= length

        await eventually(reached, f"{session_id}: {length} log entries", within)


@pytest.fixture
async def truth(redis_client: aioredis.Redis) -> Truth:
    return Truth(redis_client)


def event_ids(frames: list[SSEFrame]) -> list[str | None]:
    return [f.id for f in frames if f.is_event]


def assert_exactly_the_log(
    frames: list[SSEFrame], log: list[LogEntry], *, after: str | None, client: str
) -> None:
    """``frames`` (events only, STREAM_CLOSED excluded) are exactly the log entries after
    ``after``: every one once, in log order, byte for byte the payload the worker published."""
    expected = [e for e in log if after is None or _id_key(e.id) > _id_key(after)]
    got = [(f.id, f.event, f.data) for f in frames]
    want = [(e.id, e.type, e.data) for e in expected]
    ids = [f.id for f in frames]
    assert len(set(ids)) == len(ids), f"{client}: an event arrived twice: {ids}"
    assert got == want, f"{client}: got {len(got)} events, the log has {len(want)} after {after}"


def as_frames(events: list[StreamEvent]) -> list[SSEFrame]:
    """Typed events from the product's client as the frames they came in (single streams: the SSE
    id is the payload's ``eventId``; the contract re-encodes the worker's bytes exactly)."""
    frames = []
    for event in events:
        assert not isinstance(event, OtherEvent), f"not an event of the contract: {event}"
        frames.append(
            SSEFrame(
                raw=b"", event=event.TYPE, data=event.to_json(), id=getattr(event, "event_id", None)
            )
        )
    return frames


async def take(events: EventStream, count: int, within: float = 10.0) -> list[StreamEvent]:
    """The next ``count`` events of a stream of the product's client."""
    out: list[StreamEvent] = []
    async with asyncio.timeout(within):
        while len(out) < count:
            out.append(await anext(events))
    return out


async def to_the_end(events: EventStream, within: float = 20.0) -> list[StreamEvent]:
    """Every further event until the stream ends normally (STREAM_CLOSED completed, or 204)."""
    async with asyncio.timeout(within):
        rest = [event async for event in events]
    assert events.close_reason == "completed"
    return rest


async def opened(events: EventStream, within: float = 10.0) -> None:
    """Until the stream is open (its 200 came: the relay subscribed it before answering)."""

    async def is_open() -> bool:
        return events.state == "open"

    await eventually(is_open, "the stream open", within)


async def silent(events: EventStream, seconds: float) -> None:
    """No event for ``seconds``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            event = await anext(events)
        raise AssertionError(f"expected no event, got {event}")


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def worker_outcomes(worker: ManagedProcess) -> list[dict[str, Any]]:
    """The worker's one-line-per-job outcomes (JSON log lines with an ``outcome``)."""
    lines = []
    for line in worker.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "outcome" in record:
                lines.append(record)
    return lines


async def drive(
    jobs: UploadJobsClient, session_id: str, photos: int, every: float, fail_every: int = 7
) -> set[str]:
    """Report ``photos`` outcomes one every ``every`` seconds, as an upload pipeline paced by real
    uploads would; every ``fail_every``-th photo fails. Returns the failed photo ids."""
    failed = set()
    for n in range(photos):
        photo = f"img{n:04d}"
        if n % fail_every == fail_every // 2:
            await jobs.fail_photo_upload(session_id, photo, f"checksum mismatch on {photo}")
            failed.add(photo)
        else:
            await jobs.complete_photo_upload(session_id, photo)
        await asyncio.sleep(every)
    return failed


@contextlib.asynccontextmanager
async def running(task: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``task`` in the background for the block; cancelled if the block leaves early."""
    background = asyncio.ensure_future(task)
    try:
        yield background
    finally:
        if not background.done():
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background


async def gather_bounded(calls: list[Callable[[], Awaitable[T]]], limit: int = 50) -> list[T]:
    """Run ``calls`` concurrently, at most ``limit`` at a time. (UploadJobsClient's pool holds
    redis-py's default 100 connections and raises MaxConnectionsError past them.)"""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


@contextlib.asynccontextmanager
async def supervised(cluster: Cluster) -> AsyncIterator[list[int]]:
    """What the deployment's supervisor does for workers (compose: ``restart: unless-stopped``):
    for the block, start a new worker whenever one exits. Yields the exit codes seen."""
    wanted = len(cluster.workers)
    exits: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(RuntimeError):  # exited at once: Redis not back yet
                exits.extend(await asyncio.to_thread(cluster.restart_exited_workers, wanted))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await done.wait()

    watcher = asyncio.create_task(watch())
    try:
        yield exits
    finally:
        done.set()
        await watcher
