"""rapidphoto_worker.worker: BatchClaimWorker claims jobs as arq would, many per round trip."""

from __future__ import annotations

import asyncio
from typing import Any

import arq
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_worker.context import CTX_KEY
from rapidphoto_worker.worker import BatchClaimWorker
from tests.support.redis_server import RedisServer
from tests.support.worker import make_worker, run_worker_burst, running_worker, wait_for


async def queue(client: aioredis.Redis, **scores: int) -> None:
    await client.zadd("arq:queue", scores)


async def test_claims_only_due_jobs_that_nobody_holds(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    now = int(asyncio.get_running_loop().time())  # any score in the past will do
    await queue(redis_client, due=1000 + now, held=1000, deferred=10**15)
    await redis_client.set("arq:in-progress:held", "1", px=5000)
    worker = make_worker(redis_url)
    assert isinstance(worker, BatchClaimWorker)
    try:
        claimed = await worker._claim_jobs(["due", "held", "deferred", "finished"])
    finally:
        await worker.pool.aclose()

    assert claimed == [("due", 1000 + now)]
    # Held with arq's own key and lifetime: job_timeout + 10 s.
    ttl = await redis_client.pttl("arq:in-progress:due")
    assert worker.in_progress_timeout_s * 1000 - 1000 < ttl <= worker.in_progress_timeout_s * 1000
    assert await redis_client.pttl("arq:in-progress:held") <= 5000  # untouched
    assert await redis_client.exists("arq:in-progress:deferred", "arq:in-progress:finished") == 0


async def test_never_runs_more_than_max_jobs_at_once_and_runs_them_all(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    running = 0
    most = 0

    async def on_start(ctx: dict[str, Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)  # hold the slot a while: every slot gets busy

    async def on_end(ctx: dict[str, Any]) -> None:
        nonlocal running
        running -= 1

    async with UploadJobsClient.connect(redis_url) as jobs:
        await jobs.start_upload_session("s1", "u1", 60)
        for n in range(60):
            await jobs.complete_photo_upload("s1", f"p{n}")

    await run_worker_burst(redis_url, max_jobs=3, on_job_start=on_start, on_job_end=on_end)

    assert most == 3
    assert await redis_client.hget(keys.session_state_key("s1"), "uploaded") == "60"


async def test_shares_a_queue_with_stock_arq_workers_without_running_a_job_twice(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    runs: list[str] = []

    async def on_start(ctx: dict[str, Any]) -> None:
        runs.append(ctx["job_id"])

    async with (
        running_worker(
            redis_url, worker_class=arq.Worker, max_jobs=5, on_job_start=on_start
        ) as stock,
        running_worker(redis_url, max_jobs=5, on_job_start=on_start) as batch,
    ):

        async def both_ready() -> bool:
            return CTX_KEY in stock.ctx and CTX_KEY in batch.ctx

        async def done(*job_ids: str) -> bool:
            keys = [f"arq:result:{job_id}" for job_id in job_ids]
            return await redis_client.exists(*keys) == len(keys)

        await wait_for(both_ready, within=10, what="both workers started")
        async with UploadJobsClient.connect(redis_url) as jobs:
            # The session first, so that no photo job is retried: then every job runs once.
            start = (await jobs.start_upload_session("s1", "u1", 500)).job_id
            await wait_for(lambda: done(start), within=10, what="session started")
            ids = [(await jobs.complete_photo_upload("s1", f"p{n}")).job_id for n in range(500)]
        await wait_for(lambda: done(*ids), within=30, what="all jobs done")

    assert stock.jobs_complete > 0
    assert batch.jobs_complete > 0
    assert sorted(runs) == sorted([start, *ids])  # each job ran once, by one of the two
    assert await redis_client.hget(keys.session_state_key("s1"), "uploaded") == "500"


async def test_waits_while_redis_is_out_of_memory_and_then_runs_every_job_once(
    own_redis: RedisServer,
) -> None:
    """Bug found by the Redis fault matrix (issue 9): with Redis out of memory (``maxmemory``
    reached, ``noeviction``) the claim script's OutOfMemoryError ended arq's poll loop, and with it
    ``rapidphoto-worker`` (main() restarts only after connection errors): a crash loop for as long
    as the condition lasts. The worker must wait, then run every job once memory is back."""
    async with UploadJobsClient.connect(own_redis.url) as jobs:
        await jobs.start_upload_session("s1", "u1", 3)
        for n in range(3):
            await jobs.complete_photo_upload("s1", f"p{n}")
    async with aioredis.Redis.from_url(own_redis.url, decode_responses=True) as admin:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write refused, the claim script's too

        async def refused(times: int) -> bool:
            stats = await admin.info("errorstats")
            return int(stats.get("errorstat_OOM", {}).get("count", 0)) >= times

        async with running_worker(own_redis.url) as worker:

            def dead() -> bool:
                return worker.main_task is not None and worker.main_task.done()

            async def refused_or_dead() -> bool:
                return dead() or await refused(3)

            await wait_for(refused_or_dead, 10, "three refused claims")
            assert not dead(), worker.main_task
            await admin.config_set("maxmemory", 0)

            async def finished() -> bool:
                queued = await admin.zcard("arq:queue")
                return queued == 0 and all(task.done() for task in worker.tasks.values())

            await wait_for(finished, 10, "every job finished")
            assert worker.jobs_complete == 4
            assert not dead()
        log: list[tuple[str, dict[str, str]]] = await admin.xrange(keys.session_log_key("s1"))  # type: ignore[assignment]
    assert [fields["type"] for _, fields in log] == [
        "SESSION_STARTED",
        "PHOTO_UPLOADED",
        "PHOTO_UPLOADED",
        "PHOTO_UPLOADED",
        "SESSION_COMPLETED",
    ]
