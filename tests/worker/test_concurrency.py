"""Two worker processes on one session: every photo completed twice, jobs in random order.

The scripts make each command atomic, so however the jobs interleave across processes: exact
counts, one PHOTO_UPLOADED per photo with the counts going up by one each time, one completion,
one notification, and the channel carries exactly the log, in log order (PROTOCOL §6).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import QUEUE_NAME
from rapidphoto_tools.client import UploadJobsClient
from tests.support.processes import start_worker
from tests.support.worker import (
    WORKER_READY_LINE,
    ChannelRecorder,
    notification_log,
    session_log,
    wait_for,
)

PHOTOS = 500

pytestmark = pytest.mark.e2e


def stream_id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_two_workers_apply_each_photo_once_in_one_total_order(
    redis_url: str, redis_client: aioredis.Redis, log_dir: Path
) -> None:
    env = {"SESSION_LOG_MAXLEN": str(PHOTOS * 4)}
    workers = [start_worker(redis_url, log_dir, name=f"worker-{n}", **env) for n in (1, 2)]
    channels = (keys.session_channel("s1"), keys.notification_channel("u1"))
    try:

        async def both_ready() -> bool:
            return all(WORKER_READY_LINE in w.log() for w in workers)

        await wait_for(both_ready, within=20, what="both workers ready")
        photos = [f"p{n}" for n in range(PHOTOS)] * 2
        random.shuffle(photos)
        start_at = random.randrange(50)  # some photo jobs overtake the start and are retried
        async with (
            ChannelRecorder(redis_url, *channels) as recorder,
            UploadJobsClient.connect(redis_url) as jobs,
        ):
            for n, photo in enumerate(photos):
                if n == start_at:
                    await jobs.start_upload_session("s1", "u1", PHOTOS)
                await jobs.complete_photo_upload("s1", photo)

            async def all_done() -> bool:
                state = await redis_client.hget(keys.session_state_key("s1"), keys.STATE_UPLOADED)
                return state == str(PHOTOS) and await redis_client.zcard(QUEUE_NAME) == 0

            await wait_for(all_done, within=60, what="every job done")
            published = await recorder.published()
        for worker in workers:
            worker.stop()
            assert worker.proc is not None
            assert worker.proc.returncode == 0, worker.log()[-2000:]
    finally:
        for worker in workers:
            worker.kill()

    state = await redis_client.hgetall(keys.session_state_key("s1"))
    assert (state["uploaded"], state["failed"], state["status"]) == (str(PHOTOS), "0", "COMPLETED")

    log = await session_log(redis_client, "s1")
    ids = [stream_id(entry_id) for entry_id, _, _ in log]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    types = [t for _, t, _ in log]
    assert types == ["SESSION_STARTED"] + ["PHOTO_UPLOADED"] * PHOTOS + ["SESSION_COMPLETED"]
    photo_events = [json.loads(data) for _, t, data in log if t == "PHOTO_UPLOADED"]
    assert sorted(e["photoId"] for e in photo_events) == sorted(set(photos))
    assert [e["uploadedPhotos"] for e in photo_events] == list(range(1, PHOTOS + 1))
    assert all(json.loads(data)["eventId"] == entry_id for entry_id, _, data in log)

    notifications = await notification_log(redis_client, "u1")
    assert len(notifications) == 1
    assert published == {
        channels[0]: [data for _, _, data in log],
        channels[1]: [notifications[0][2]],
    }

    # Both processes took part.
    for worker in workers:
        assert '"outcome": "applied"' in worker.log(), f"{worker.name} applied nothing"
