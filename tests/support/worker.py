"""Run the real worker in-process for tests, and watch what it writes and publishes.

- :func:`worker_context`: the worker's :class:`WorkerContext` (client + loaded scripts), to call
  ``rapidphoto_worker.commands`` directly.
- :func:`run_worker_burst` / :func:`running_worker`: a real arq worker (``rapidphoto-worker``'s own
  :class:`BatchClaimWorker` by default, or stock ``arq.Worker``) with our ``WorkerSettings``, against a
  given Redis URL, until the queue is empty / while a block runs.
- :class:`ChannelRecorder`: what was published on some channels, in order, with a marker trick
  instead of sleeps to know that nothing else is on its way.
- :func:`job_result`, :func:`session_log`, :func:`wait_for`: reading results and logs, waiting on
  conditions with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.worker import Worker, get_kwargs
from redis.asyncio import ConnectionPool

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import QUEUE_NAME, deserialize_job, serialize_job
from rapidphoto_contract.settings import WorkerConfig
from rapidphoto_worker.context import WorkerContext
from rapidphoto_worker.main import SETTINGS_CTX_KEY, WorkerSettings
from rapidphoto_worker.worker import BatchClaimWorker

#: How long a test's worker waits for its in-flight jobs before arq's close() (``running_worker``).
IN_FLIGHT_GRACE_SECONDS: Final = 2.0

#: What the worker process logs once it can take jobs (rapidphoto_worker.main.startup).
WORKER_READY_LINE = '"worker ready"'


def worker_settings(redis_url: str, **overrides: Any) -> WorkerConfig:
    """WorkerConfig for ``redis_url``; ``overrides`` e.g. ``session_ttl_seconds=100``."""
    return attrs.evolve(WorkerConfig(redis_url=redis_url), **overrides)


@asynccontextmanager
async def worker_context(settings: WorkerConfig) -> AsyncIterator[WorkerContext]:
    app = await WorkerContext.create(settings)
    try:
        yield app
    finally:
        await app.aclose()


def arq_pool(redis_url: str) -> ArqRedis:
    """An arq client for ``redis_url``, made as the contract's UploadJobsClient makes its own.

    Not ``arq.create_pool``: that passes redis-py's deprecated ``retry_on_timeout``, a
    DeprecationWarning (an error in this suite) on every connect with redis-py >= 6.
    """
    pool = ArqRedis(
        connection_pool=ConnectionPool.from_url(redis_url),
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
        default_queue_name=QUEUE_NAME,
    )
    pool.auto_close_connection_pool = True  # closing the client closes its own pool
    return pool


def make_worker(
    redis_url: str,
    settings: WorkerConfig | None = None,
    worker_class: type[Worker] = BatchClaimWorker,
    **overrides: Any,
) -> Worker:
    """A worker with our WorkerSettings, as ``rapidphoto-worker`` builds it, for in-process runs
    (its arq pool from :func:`arq_pool`; the worker closes it)."""
    kwargs: dict[str, Any] = {
        **get_kwargs(WorkerSettings),  # type: ignore[arg-type]
        "redis_pool": arq_pool(redis_url),
        "ctx": {SETTINGS_CTX_KEY: settings or worker_settings(redis_url)},
        "handle_signals": False,
        "poll_delay": 0.01,
        **overrides,
    }
    return worker_class(**kwargs)


async def run_worker_burst(
    redis_url: str,
    settings: WorkerConfig | None = None,
    worker_class: type[Worker] = BatchClaimWorker,
    within: float = 30.0,
    **overrides: Any,
) -> Worker:
    """Run a worker in burst mode: until the queue is empty, deferred retries included."""
    worker = make_worker(redis_url, settings, worker_class, burst=True, **overrides)
    try:
        await asyncio.wait_for(worker.async_run(), within)
    finally:
        await worker.close()
    return worker


@asynccontextmanager
async def running_worker(
    redis_url: str,
    settings: WorkerConfig | None = None,
    worker_class: type[Worker] = BatchClaimWorker,
    **overrides: Any,
) -> AsyncIterator[Worker]:
    """A worker taking jobs in the background while the block runs."""
    worker = make_worker(redis_url, settings, worker_class, **overrides)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        # arq's close() cancels the job tasks still running, then gathers them without
        # return_exceptions: a job finishing its bookkeeping at that moment (its result already
        # written, so the test saw it done) came out of close() as a CancelledError and failed
        # the test (seen once in a clean-clone run under load). In-flight jobs get a moment first.
        in_flight = [t for t in worker.tasks.values() if not t.done()]
        if in_flight:
            await asyncio.wait(in_flight, timeout=IN_FLIGHT_GRACE_SECONDS)
        await worker.close()  # cancels the worker's main task
        await asyncio.gather(task, return_exceptions=True)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until true; ``TimeoutError`` naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


class ChannelRecorder:
    """Subscribes to channels (and channel patterns) and returns, on demand, everything published
    on them so far, by channel.

    :meth:`published` publishes a unique marker on each channel (for a pattern, on a channel it
    matches) and reads until every marker is back. Redis delivers a connection's messages in
    publication order, so once the markers are in, every earlier publication is too: "exactly one
    publication" is checked without sleeping.
    """

    def __init__(self, redis_url: str, *channels: str, patterns: tuple[str, ...] = ()) -> None:
        self._client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._pubsub = self._client.pubsub()
        self._channels = channels
        self._patterns = patterns

    async def __aenter__(self) -> ChannelRecorder:
        if self._channels:
            await self._pubsub.subscribe(*self._channels)
        if self._patterns:
            await self._pubsub.psubscribe(*self._patterns)
        confirmed = 0
        deadline = time.monotonic() + 5
        while confirmed < len(self._channels) + len(self._patterns):
            msg = await self._pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] in ("subscribe", "psubscribe"):
                confirmed += 1
            if time.monotonic() > deadline:
                raise TimeoutError("no subscribe confirmation")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()

    async def published(self, within: float = 10.0) -> dict[str, list[str]]:
        """Every payload published on each channel since the last call, in order (a subscribed
        channel is always present, maybe with an empty list)."""
        marker = f"__marker__{uuid.uuid4().hex}"
        marker_channels = {*self._channels, *(p.replace("*", "__marker__") for p in self._patterns)}
        for channel in marker_channels:
            await self._client.publish(channel, marker)
        waiting = set(marker_channels)
        seen: dict[str, list[str]] = {channel: [] for channel in self._channels}
        deadline = time.monotonic() + within
        while waiting:
            msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is not None:
                if msg["data"] == marker:
                    waiting.discard(msg["channel"])
                elif not str(msg["data"]).startswith("__marker__"):
                    seen.setdefault(msg["channel"], []).append(msg["data"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"markers not back on {sorted(waiting)}")
        return seen


async def log_entries(client: aioredis.Redis, key: str) -> list[tuple[str, str, str]]:
    """``(entry id, type, data)`` of every entry of an event log (decode_responses client)."""
    raw: list[tuple[str, dict[str, str]]] = await client.xrange(key)  # type: ignore[assignment]
    return [(i, f[keys.LOG_FIELD_TYPE], f[keys.LOG_FIELD_DATA]) for i, f in raw]


async def session_log(client: aioredis.Redis, session_id: str) -> list[tuple[str, str, str]]:
    return await log_entries(client, keys.session_log_key(session_id))


async def notification_log(client: aioredis.Redis, user_id: str) -> list[tuple[str, str, str]]:
    return await log_entries(client, keys.user_notifications_log_key(user_id))


async def job_result(client: aioredis.Redis, job_id: str) -> dict[str, Any] | None:
    """A job's stored result (``arq:result:<id>``), parsed from its JSON; None while it has none."""
    raw = await client.get(f"arq:result:{job_id}")
    if raw is None:
        return None
    result: dict[str, Any] = json.loads(raw)
    return result


async def our_keys(client: aioredis.Redis) -> list[str]:
    """Every data key of ours (not arq's) in the database."""
    return sorted([key async for key in client.scan_iter(match=f"{keys.KEY_PREFIX}:*")])
