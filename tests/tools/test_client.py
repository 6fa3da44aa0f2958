"""The typed enqueue client (PROTOCOL §3) against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from typing import Any, cast

import arq.jobs
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from rapidphoto_contract.jobs import (
    QUEUE_NAME,
    InvalidCommand,
    deserialize_job,
)
from rapidphoto_tools.client import UploadJobsClient
from tests.support.arq_queue import aqueued_jobs
from tests.support.redis_server import RedisServer, free_port

# --- the client against a real Redis -------------------------------------------------------------


async def test_client_enqueues_json_jobs_in_arqs_format(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    before_ms = int(time.time() * 1000)
    async with UploadJobsClient.connect(redis_url) as jobs:
        start = await jobs.start_upload_session("s1", "u1", 3)
        done = await jobs.complete_photo_upload("s1", "p1")
        failed = await jobs.fail_photo_upload("s1", "p2", "corrupt file / é")
    after_ms = int(time.time() * 1000)

    queued = {job.job_id: job.data for job in await aqueued_jobs(redis_client)}
    assert set(queued) == {start.job_id, done.job_id, failed.job_id}
    for job in await aqueued_jobs(redis_client):
        assert set(job.data) == {"t", "f", "a", "k", "et"}
        assert job.data["a"] == []
        # arq rounds (not truncates) the enqueue time to the ms: allow that one millisecond.
        assert before_ms <= job.data["et"] <= after_ms + 1
        assert before_ms <= job.score <= after_ms + 1  # runnable now
    assert queued[start.job_id]["f"] == "start_upload_session"
    assert queued[start.job_id]["k"] == {"session_id": "s1", "user_id": "u1", "total_photos": 3}
    assert queued[done.job_id]["f"] == "complete_photo_upload"
    assert queued[done.job_id]["k"] == {"session_id": "s1", "photo_id": "p1"}
    assert queued[failed.job_id]["f"] == "fail_photo_upload"
    assert queued[failed.job_id]["k"] == {
        "session_id": "s1",
        "photo_id": "p2",
        "reason": "corrupt file / é",
    }
    # The stored bytes are JSON, never pickle.
    raw = cast(str | None, await redis_client.get(f"arq:job:{failed.job_id}"))
    assert raw is not None
    assert raw.startswith("{")
    # Nothing else was written: only arq's queue and job keys.
    keys = set(await redis_client.keys("*"))
    assert keys == {QUEUE_NAME, *(f"arq:job:{job_id}" for job_id in queued)}


async def test_client_jobs_read_back_through_arq(redis_url: str) -> None:
    async with UploadJobsClient.connect(redis_url) as jobs:
        job = await jobs.fail_photo_upload("s1", "p1", "too large")
        info = await job.info()
        assert info is not None
        assert info.function == "fail_photo_upload"
        assert info.kwargs == {"session_id": "s1", "photo_id": "p1", "reason": "too large"}
        assert await job.status() == arq.jobs.JobStatus.queued


async def test_client_with_a_job_id_enqueues_once(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with UploadJobsClient.connect(redis_url) as jobs:
        first = await jobs.complete_photo_upload("s1", "p1", job_id="s1-p1")
        again = await jobs.complete_photo_upload("s1", "p1", job_id="s1-p1")
    assert first.job_id == again.job_id == "s1-p1"
    assert await redis_client.zrange(QUEUE_NAME, 0, -1) == ["s1-p1"]


async def test_client_is_awaitable_too(redis_url: str, redis_client: aioredis.Redis) -> None:
    jobs = await UploadJobsClient.connect(redis_url)
    try:
        await jobs.complete_photo_upload("s1", "p1")
    finally:
        await jobs.close()
    assert await redis_client.zcard(QUEUE_NAME) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (("start_upload_session", "s1", "u1", 0), "total_photos must be between"),
        (("start_upload_session", "s1", "u1", True), "total_photos must be an integer"),
        (("start_upload_session", "s1", "u1", 10_001), "total_photos must be between"),
        (("start_upload_session", "notifications", "u1", 1), "session_id must match"),
        (("start_upload_session", "s1", "u:1", 1), "user_id must match"),
        (("complete_photo_upload", "s 1", "p1"), "session_id must match"),
        (("complete_photo_upload", "s1", "p*"), "photo_id must match"),
        (("fail_photo_upload", "s1", "p1", ""), "reason must be a non-empty string"),
        (("fail_photo_upload", "s1", "p1", "x" * 1025), "at most 1024"),
        (("fail_photo_upload", "s1", "p{1}", "x"), "photo_id must match"),
    ],
)
async def test_client_rejects_bad_args_before_enqueueing(
    redis_url: str, redis_client: aioredis.Redis, call: tuple[Any, ...], message: str
) -> None:
    name, *args = call
    async with UploadJobsClient.connect(redis_url) as jobs:
        with pytest.raises(InvalidCommand) as info:
            await getattr(jobs, name)(*args)
    assert message in str(info.value)
    assert await redis_client.dbsize() == 0  # nothing written


async def test_hand_written_job_in_the_documented_layout_is_read_by_arq(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """A pipeline in another language enqueues by writing exactly what the module docstring says."""
    job = {
        "t": 1,
        "f": "complete_photo_upload",
        "a": [],
        "k": {"session_id": "s1", "photo_id": "p1"},
        "et": 1764213600000,
    }
    await redis_client.set("arq:job:by-hand", json.dumps(job))
    await redis_client.zadd(QUEUE_NAME, {"by-hand": 1764213600000})
    async with UploadJobsClient.connect(redis_url) as jobs:
        info = await arq.jobs.Job("by-hand", jobs.pool, _deserializer=deserialize_job).info()
    assert info is not None
    assert info.function == "complete_photo_upload"
    assert info.kwargs == {"session_id": "s1", "photo_id": "p1"}


async def test_connect_emits_no_warnings(redis_url: str) -> None:
    """Regression: ``connect`` used arq's ``create_pool``, which passes redis-py's deprecated
    ``retry_on_timeout``: a ``DeprecationWarning`` on every connect with redis-py >= 6, an error
    under this suite's ``filterwarnings = error`` (and in any pipeline running with ``-W error``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with UploadJobsClient.connect(redis_url) as jobs:
            await jobs.complete_photo_upload("s1", "p1")
    assert [str(w.message) for w in caught] == []


async def test_connect_to_a_dead_redis_fails_fast() -> None:
    """No silent 5 s of retries (arq's default): the caller sees the error and decides."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        await UploadJobsClient.connect(url)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("query_db", [False, True])
async def test_connect_honours_the_database_in_the_url(
    redis_url: str, redis_client: aioredis.Redis, query_db: bool
) -> None:
    base, _, db = redis_url.rpartition("/")
    url = f"{base}/?db={db}" if query_db else redis_url
    async with UploadJobsClient.connect(url) as jobs:
        await jobs.complete_photo_upload("s1", "p1")
    assert await redis_client.zcard(QUEUE_NAME) == 1


async def test_client_survives_more_concurrent_enqueues_than_connections(redis_url: str) -> None:
    """Regression: the client used redis-py's default pool, which raises MaxConnectionsError at
    once past its size, so 300 concurrent enqueues from one client failed. Now they wait."""
    async with UploadJobsClient.connect(redis_url, max_connections=4) as jobs:
        await asyncio.gather(*(jobs.complete_photo_upload("s1", f"p{i}") for i in range(300)))
        assert await jobs.pool.zcard("arq:queue") == 300


async def test_an_enqueue_that_returns_is_queued_even_when_connections_are_killed(
    own_redis: RedisServer,
) -> None:
    """Bug found by the Redis fault matrix (issue 9): an enqueue whose connection Redis closed
    between arq's WATCH and EXEC (a Redis restart, ``CLIENT KILL TYPE normal``) returned as if the
    job were queued, and the job was lost. redis-py turns a connection lost while watching into a
    WatchError, which arq's ``enqueue_job`` takes for "a job with this id exists" and returns None.
    An enqueue that returns has queued its job; one that could not raises."""
    returned: list[str] = []
    async with (
        UploadJobsClient.connect(own_redis.url) as jobs,
        aioredis.Redis.from_url(own_redis.url, decode_responses=True) as admin,
    ):

        async def enqueue(n: int) -> None:
            with contextlib.suppress(redis.exceptions.RedisError):  # raised: the caller knows
                job = await jobs.complete_photo_upload("s1", f"p{n}", job_id=f"job{n}")
                returned.append(job.job_id)

        async def kill_command_connections() -> None:
            for _ in range(40):
                await asyncio.sleep(0.005)
                await admin.client_kill_filter(_type="normal", skipme=True)

        await asyncio.gather(kill_command_connections(), *(enqueue(n) for n in range(1500)))
        queued = set(await admin.zrange("arq:queue", 0, -1))
    assert len(returned) > 1000  # most went through
    assert sorted(set(returned) - queued) == []
