"""A worker killed mid-stream (SIGKILL: no cleanup at all) loses nothing and counts nothing twice.

Jobs the dead worker held stay marked in progress until arq's mark expires (job_timeout + 10 s), then
another worker runs them again; those whose script had already run are duplicates and change nothing
(PROTOCOL §6: "A job retried after a crash does not count twice").
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import QUEUE_NAME, CompletePhotoUpload
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_worker import commands
from rapidphoto_worker.main import JOB_TIMEOUT_SECONDS
from tests.conftest import CPU_HEAVY
from tests.support.processes import start_worker
from tests.support.worker import (
    notification_log,
    session_log,
    wait_for,
    worker_context,
    worker_settings,
)

PHOTOS = 1500
#: Keep every event, so the log can be checked photo by photo.
ENV = {"SESSION_LOG_MAXLEN": str(PHOTOS * 2)}

pytestmark = [pytest.mark.e2e, CPU_HEAVY]


async def test_a_worker_killed_mid_stream_loses_nothing_and_doubles_nothing(
    redis_url: str, redis_client: aioredis.Redis, log_dir: Path
) -> None:
    state_key = keys.session_state_key("s1")

    async def uploaded() -> int:
        return int(await redis_client.hget(state_key, keys.STATE_UPLOADED) or 0)

    # Everything queued before the worker starts, so that it is busy when it dies.
    async with UploadJobsClient.connect(redis_url) as jobs:
        await jobs.start_upload_session("s1", "u1", PHOTOS)
        for n in range(PHOTOS):
            await jobs.complete_photo_upload("s1", f"p{n}")

    first = start_worker(redis_url, log_dir, name="worker-1", **ENV)
    try:

        async def some_done() -> bool:
            return await uploaded() >= 300

        await wait_for(some_done, within=30, what="300 photos done", interval=0.002)
        first.kill()
    finally:
        first.kill()

    at_kill = await uploaded()
    held = [key async for key in redis_client.scan_iter(match="arq:in-progress:*")]
    assert at_kill < PHOTOS, "the worker finished before it was killed: nothing was tested"
    assert held, "no job was in flight when the worker died: nothing was tested"

    # SIGKILL lands between jobs as often as inside one. Make sure both cases are there: for some held
    # jobs, run the script now, as if the dead worker had run it and died before telling arq.
    replayed = held[: max(1, len(held) // 2)]
    async with worker_context(worker_settings(redis_url, session_log_maxlen=PHOTOS * 2)) as app:
        for key in replayed:
            raw = await redis_client.get("arq:job:" + key.removeprefix("arq:in-progress:"))
            assert raw is not None
            job = json.loads(raw)
            await commands.complete_photo_upload(app, CompletePhotoUpload.parse(job["k"]))

    second = start_worker(redis_url, log_dir, name="worker-2", **ENV)
    try:

        async def all_done() -> bool:
            return await uploaded() == PHOTOS and await redis_client.zcard(QUEUE_NAME) == 0

        # The jobs held by the dead worker wait for their in-progress mark to expire.
        await wait_for(all_done, within=JOB_TIMEOUT_SECONDS + 40, what="every job done")
    finally:
        second.stop()

    state = await redis_client.hgetall(state_key)
    assert (state["uploaded"], state["failed"], state["status"]) == (str(PHOTOS), "0", "COMPLETED")
    log = await session_log(redis_client, "s1")
    photo_events = Counter(
        json.loads(data)["photoId"] for _, t, data in log if t == "PHOTO_UPLOADED"
    )
    assert photo_events == Counter({f"p{n}": 1 for n in range(PHOTOS)})
    assert [t for _, t, _ in log].count("SESSION_COMPLETED") == 1
    assert len(await notification_log(redis_client, "u1")) == 1
    # The held jobs ran again once their mark expired; those whose script had run (the replayed
    # ones, and any the dead worker finished but could not record) were duplicates: no change.
    lines = [json.loads(line) for line in second.log().splitlines()]
    duplicates = {x["job_id"] for x in lines if x.get("outcome") == "duplicate"}
    job_ids = {key.removeprefix("arq:in-progress:") for key in held}
    assert {key.removeprefix("arq:in-progress:") for key in replayed} <= duplicates <= job_ids
    # Progress never went backwards or skipped: the n-th photo event says n uploaded.
    counts = [json.loads(data)["uploadedPhotos"] for _, t, data in log if t == "PHOTO_UPLOADED"]
    assert counts == list(range(1, PHOTOS + 1))
