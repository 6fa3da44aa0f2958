"""rapidphoto_worker.main: the arq settings, the job functions end to end through a real arq worker,
and the ``rapidphoto-worker`` console script."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import arq
import pytest
import redis
import redis.asyncio as aioredis
from arq.jobs import Job

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    JOB_NAMES,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    deserialize_job,
    serialize_job,
)
from rapidphoto_contract.settings import ConfigError
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_worker import commands, main
from rapidphoto_worker.context import CTX_KEY
from rapidphoto_worker.worker import BatchClaimWorker
from tests.support.processes import BIN, base_env, start_worker, wait_until
from tests.support.redis_server import RedisServer, with_db
from tests.support.worker import (
    WORKER_READY_LINE,
    ChannelRecorder,
    arq_pool,
    job_result,
    our_keys,
    run_worker_burst,
    running_worker,
    session_log,
    wait_for,
    worker_settings,
)

# --- settings -------------------------------------------------------------------------------------


def test_worker_settings() -> None:
    settings = main.WorkerSettings
    assert [f.name for f in settings.functions] == list(JOB_NAMES)
    assert settings.queue_name == QUEUE_NAME == "arq:queue"
    # PROTOCOL §3: JSON both ways, never pickle.
    assert settings.job_serializer is serialize_job
    assert settings.job_deserializer is deserialize_job
    # A job held by a killed worker runs again after job_timeout + 10 s.
    assert settings.job_timeout <= 10
    assert settings.max_tries == commands.MAX_TRIES
    assert settings.keep_result == 3600  # PROTOCOL §3: results kept as arq keeps them
    assert settings.health_check_interval < 30  # the image's HEALTHCHECK interval


async def test_the_console_script_runs_the_batch_claiming_worker(redis_url: str) -> None:
    pool = arq_pool(redis_url)
    try:
        worker = main.create_worker(redis_pool=pool, handle_signals=False)
        assert isinstance(worker, BatchClaimWorker)
        assert worker.queue_name == QUEUE_NAME
        assert worker.job_serializer is serialize_job
        assert worker.max_jobs == main.MAX_JOBS
    finally:
        await pool.aclose()


# --- jobs through a real arq worker ---------------------------------------------------------------


@pytest.mark.parametrize("worker_class", [arq.Worker, BatchClaimWorker])
async def test_jobs_run_end_to_end_through_a_real_arq_worker(
    redis_url: str, redis_client: aioredis.Redis, worker_class: type[arq.Worker]
) -> None:
    """Enqueued with the contract's client, stored as JSON, run by arq (with redis-py 8), state
    changed and events published; the result is JSON too."""
    assert int(redis.__version__.split(".")[0]) >= 8
    channels = (keys.session_channel("s1"), keys.notification_channel("u1"))
    async with (
        UploadJobsClient.connect(redis_url) as jobs,
        ChannelRecorder(redis_url, *channels) as recorder,
    ):
        start = await jobs.start_upload_session("s1", "u1", 2)
        stored = await redis_client.get(f"arq:job:{start.job_id}")
        assert stored is not None
        assert json.loads(stored) == {
            "t": None,
            "f": START_UPLOAD_SESSION,
            "a": [],
            "k": {"session_id": "s1", "user_id": "u1", "total_photos": 2},
            "et": json.loads(stored)["et"],
        }
        first = await run_worker_burst(redis_url, worker_class=worker_class)
        # Jobs enqueued in the same millisecond have no order, so the photos come second.
        photo = await jobs.complete_photo_upload("s1", "p1")
        failure = await jobs.fail_photo_upload("s1", "p2", "too dark")
        second = await run_worker_burst(redis_url, worker_class=worker_class)
        published = await recorder.published()

    for worker, jobs_done in ((first, 1), (second, 2)):
        assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (jobs_done, 0, 0)
    state = await redis_client.hgetall(keys.session_state_key("s1"))
    assert (state["uploaded"], state["failed"], state["status"]) == ("1", "1", "COMPLETED")
    log = await session_log(redis_client, "s1")
    assert published[channels[0]] == [data for _, _, data in log]
    assert len(published[channels[1]]) == 1
    ids = {event_type: entry_id for entry_id, event_type, _ in log}
    assert list(ids) in (
        ["SESSION_STARTED", "PHOTO_UPLOADED", "PHOTO_FAILED", "SESSION_COMPLETED"],
        ["SESSION_STARTED", "PHOTO_FAILED", "PHOTO_UPLOADED", "SESSION_COMPLETED"],
    )

    results: dict[Job, dict[str, Any]] = {}
    for job, name in (
        (start, START_UPLOAD_SESSION),
        (photo, COMPLETE_PHOTO_UPLOAD),
        (failure, FAIL_PHOTO_UPLOAD),
    ):
        result = await job_result(redis_client, job.job_id)  # the stored JSON itself
        assert result is not None
        assert (result["f"], result["s"], result["t"]) == (name, True, 1)
        results[job] = result
    assert results[start]["r"] == {"outcome": "applied", "eventIds": [ids["SESSION_STARTED"]]}
    # Whichever photo ran second completed the session.
    second_type = list(ids)[2]
    completing, other = (photo, failure) if second_type == "PHOTO_UPLOADED" else (failure, photo)
    assert results[completing]["r"] == {
        "outcome": "applied",
        "eventIds": [ids[second_type], ids["SESSION_COMPLETED"]],
        "notificationId": json.loads(published[channels[1]][0])["eventId"],
    }
    assert results[other]["r"] == {"outcome": "applied", "eventIds": [ids[list(ids)[1]]]}


BAD_JOBS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    # (job, positional args, kwargs, words the error names)
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "a:b", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "a*b", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "a b", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "{a}", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "sé", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "x" * 129, "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "notifications", "user_id": "u1", "total_photos": 1},
        "session_id",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u:1", "total_photos": 1},
        "user_id",
    ),
    (START_UPLOAD_SESSION, (), {"session_id": "s2", "user_id": None, "total_photos": 1}, "user_id"),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": 0},
        "total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": 10001},
        "total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": "5"},
        "total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": 5.0},
        "total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": True},
        "total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1"},
        "missing argument(s) total_photos",
    ),
    (
        START_UPLOAD_SESSION,
        (),
        {"session_id": "s2", "user_id": "u1", "total_photos": 1, "x": 1},
        "unexpected argument(s) x",
    ),
    (START_UPLOAD_SESSION, ("s2", "u1", 1), {}, "keyword arguments only"),
    (COMPLETE_PHOTO_UPLOAD, (), {"session_id": "s1"}, "missing argument(s) photo_id"),
    (COMPLETE_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p 1"}, "photo_id"),
    (COMPLETE_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": ["p1"]}, "photo_id"),
    (COMPLETE_PHOTO_UPLOAD, (), {"session_id": 1, "photo_id": "p1"}, "session_id"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1"}, "missing argument(s) reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1", "reason": ""}, "reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1", "reason": "  "}, "reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1", "reason": 7}, "reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1", "reason": "x" * 1025}, "reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p1", "reason": "\ud800"}, "reason"),
    (FAIL_PHOTO_UPLOAD, (), {"session_id": "s1", "photo_id": "p:1", "reason": "x"}, "photo_id"),
]


async def test_bad_arguments_fail_the_job_at_once_and_change_nothing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with UploadJobsClient.connect(redis_url) as jobs:
        await jobs.start_upload_session("s1", "u1", 5)
    await run_worker_burst(redis_url)
    before = {key: await redis_client.dump(key) for key in await our_keys(redis_client)}

    pool = arq_pool(redis_url)
    try:
        job_ids = []
        for name, args, kwargs, _ in BAD_JOBS:
            job = await pool.enqueue_job(name, *args, **kwargs)
            assert job is not None
            job_ids.append(job.job_id)
    finally:
        await pool.aclose()
    patterns = ("upload-session:*", "user-notifications:*")
    async with ChannelRecorder(redis_url, patterns=patterns) as recorder:
        worker = await run_worker_burst(redis_url)
        assert await recorder.published() == {}

    assert (worker.jobs_failed, worker.jobs_retried) == (len(BAD_JOBS), 0)
    for job_id, (name, _, kwargs, words) in zip(job_ids, BAD_JOBS, strict=True):
        result = await job_result(redis_client, job_id)
        assert result is not None, (name, kwargs)
        assert result["s"] is False
        assert result["t"] == 1, "a validation error must not be retried"
        assert result["r"]["__exception__"] == "InvalidCommand"
        assert words in result["r"]["message"], result["r"]["message"]
    after = {key: await redis_client.dump(key) for key in await our_keys(redis_client)}
    assert after == before


async def test_a_photo_job_whose_session_never_starts_is_retried_for_the_window_then_fails(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """PROTOCOL §3: retried with backoff for at least 10 s, then fails clearly. The one test that
    waits for the whole window (about 12 s)."""
    async with UploadJobsClient.connect(redis_url) as jobs:
        job = await jobs.complete_photo_upload("never", "p1")

    worker = await run_worker_burst(redis_url, within=40)

    result = await job_result(redis_client, job.job_id)
    assert result is not None
    assert result["s"] is False
    assert result["r"]["__exception__"] == "SessionNotFound"
    assert "'never' does not exist" in result["r"]["message"]
    tries = min(n for n in range(1, 100) if commands.min_waited_seconds(n) >= 10)
    assert result["t"] == worker.jobs_retried + 1 == tries
    assert (result["ft"] - result["st"]) / 1000 < 1  # the last try itself is quick
    assert (result["ft"] - result["et"]) / 1000 >= 10
    assert await our_keys(redis_client) == []


async def test_a_photo_job_that_overtakes_its_session_start_is_applied_once_it_starts(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with (
        running_worker(redis_url) as worker,
        UploadJobsClient.connect(redis_url) as jobs,
    ):
        photo = await jobs.complete_photo_upload("s1", "p1")

        async def retried() -> bool:
            return worker.jobs_retried >= 1

        async def photo_done() -> bool:
            return await job_result(redis_client, photo.job_id) is not None

        await wait_for(retried, within=10, what="the photo job to be retried")
        await jobs.start_upload_session("s1", "u1", 1)
        await wait_for(photo_done, within=10, what="the photo job to finish")

    result = await job_result(redis_client, photo.job_id)
    assert result is not None
    assert (result["s"], result["r"]["outcome"]) == (True, "applied")
    assert result["t"] >= 2
    state = await redis_client.hgetall(keys.session_state_key("s1"))
    assert (state["uploaded"], state["status"]) == ("1", "COMPLETED")


async def test_startup_refuses_an_arq_connection_to_another_database_than_redis_url(
    redis_url: str,
) -> None:
    """Under ``arq rapidphoto_worker.main.WorkerSettings`` arq's connection does not come from
    REDIS_URL; the worker must not take jobs from one Redis and write sessions to another."""
    other = arq_pool(with_db(redis_url, 0 if not redis_url.endswith("/0") else 1))
    ctx: dict[str, Any] = {"redis": other, main.SETTINGS_CTX_KEY: worker_settings(redis_url)}
    try:
        with pytest.raises(ConfigError, match="REDIS_URL"):
            await main.startup(ctx)
    finally:
        await other.aclose()
    assert CTX_KEY not in ctx

    same = arq_pool(redis_url)
    ctx = {"redis": same, main.SETTINGS_CTX_KEY: worker_settings(redis_url)}
    try:
        await main.startup(ctx)
        assert CTX_KEY in ctx
        await main.shutdown(ctx)
        assert CTX_KEY not in ctx
    finally:
        await same.aclose()


# --- the console script ---------------------------------------------------------------------------


def run_console(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rapidphoto-worker"), *args],
        env=base_env(redis_url, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://:hunter2@127.0.0.1:notaport/0"}, "REDIS_URL"),
        ({"SESSION_TTL_SECONDS": "a day"}, "SESSION_TTL_SECONDS"),
        ({"SESSION_LOG_MAXLEN": "0"}, "SESSION_LOG_MAXLEN"),
    ],
)
def test_a_bad_setting_stops_the_worker_at_start_naming_the_variable(
    redis_url: str, env: dict[str, str], variable: str
) -> None:
    done = run_console(redis_url, **env)

    assert done.returncode == 2
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert line["level"] == "error"
    assert line["variable"] == variable
    assert line["msg"].startswith(f"configuration error: {variable}: ")
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.e2e
async def test_the_console_script_runs_jobs_and_logs_one_json_line_per_job(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async def burst() -> list[dict[str, Any]]:
        done = await asyncio.to_thread(run_console, redis_url, "--burst")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stderr.splitlines()]

    async with UploadJobsClient.connect(redis_url) as jobs:
        await jobs.start_upload_session("s1", "u1", 1)
        lines = await burst()
        # Jobs enqueued in the same millisecond run in no set order: these come second.
        await jobs.start_upload_session("s1", "u2", 1)  # another owner: fails
        await jobs.complete_photo_upload("s1", "p1")
        lines += await burst()

    outcomes = [(x["job"], x["outcome"]) for x in lines if x["msg"].startswith("job ")]
    assert sorted(outcomes) == [
        ("complete_photo_upload", "applied"),
        ("start_upload_session", "applied"),
        ("start_upload_session", "failed"),
    ]
    failed = next(x for x in lines if x.get("outcome") == "failed")
    assert failed["level"] == "warning"
    assert (failed["error"], failed["session_id"], failed["user_id"]) == (
        "SessionConflict",
        "s1",
        "u2",
    )
    assert "another owner" in failed["detail"]
    assert not any("exc" in x for x in lines)  # an expected failure is one line, no traceback
    assert await redis_client.hget(keys.session_state_key("s1"), "status") == "COMPLETED"


@pytest.mark.e2e
def test_sigterm_stops_the_worker_cleanly(redis_url: str, log_dir: Path) -> None:
    worker = start_worker(redis_url, log_dir)
    health = f"{QUEUE_NAME}:health-check"  # arq's record, read by the image's HEALTHCHECK
    try:
        with redis.Redis.from_url(redis_url) as client:
            wait_until(lambda: WORKER_READY_LINE in worker.log(), timeout=20, what="worker ready")
            wait_until(lambda: bool(client.exists(health)), timeout=5, what="health record")
            assert 0 < client.pttl(health) <= (main.HEALTH_CHECK_INTERVAL_SECONDS + 1) * 1000
            worker.signal(signal.SIGTERM)
            assert worker.wait(15) == 0
            assert not client.exists(health)
    finally:
        worker.kill()
    assert '"worker stopped"' in worker.log()


@pytest.mark.e2e
def test_the_worker_survives_a_redis_restart(own_redis: RedisServer, log_dir: Path) -> None:
    """Regression: Redis restarting under a running worker ended arq's loop and the process exited
    with 1 ("cannot reach Redis"), so one Redis restart took every worker down (and scripts/run's
    whole stack with it). Now the worker restarts itself with backoff and takes jobs again."""
    worker = start_worker(own_redis.url, log_dir)
    try:
        wait_until(lambda: WORKER_READY_LINE in worker.log(), timeout=20, what="worker ready")
        # Down for longer than the client's quick retries (redis_options): the worker loses Redis.
        own_redis.kill()
        wait_until(lambda: "lost Redis, restarting the worker" in worker.log(), 20, what="restart")
        own_redis.start()  # same port, empty: like a crashed Redis without persistence

        async def enqueue() -> None:
            async with UploadJobsClient.connect(own_redis.url) as jobs:
                await jobs.start_upload_session("after-restart", "u1", 1)

        asyncio.run(enqueue())
        with redis.Redis.from_url(own_redis.url, decode_responses=True) as client:
            state = keys.session_state_key("after-restart")
            wait_until(lambda: client.hget(state, "owner") == "u1", 30, what="job after restart")
        assert worker.running()
    finally:
        worker.stop()
