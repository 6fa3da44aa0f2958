"""Jobs (PROTOCOL §3): argument rules, the JSON job codec, and the typed client against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
import warnings
from typing import Any, cast

import arq.jobs
import attrs
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    EXCEPTION_KEY,
    FAIL_PHOTO_UPLOAD,
    JOB_NAMES,
    MAX_REASON_LENGTH,
    MAX_TOTAL_PHOTOS,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    CompletePhotoUpload,
    FailPhotoUpload,
    InvalidCommand,
    JobError,
    StartUploadSession,
    UploadJobsClient,
    deserialize_job,
    serialize_job,
)
from tests.support.arq_queue import aqueued_jobs
from tests.support.redis_server import RedisServer, free_port


def test_job_names_and_queue() -> None:
    assert JOB_NAMES == ("start_upload_session", "complete_photo_upload", "fail_photo_upload")
    assert (START_UPLOAD_SESSION, COMPLETE_PHOTO_UPLOAD, FAIL_PHOTO_UPLOAD) == JOB_NAMES
    assert QUEUE_NAME == "arq:queue"
    assert MAX_TOTAL_PHOTOS == 10_000


# --- parse ---------------------------------------------------------------------------------------


def test_parse_start() -> None:
    cmd = StartUploadSession.parse({"session_id": "s1", "user_id": "u1", "total_photos": 10})
    assert cmd == StartUploadSession(session_id="s1", user_id="u1", total_photos=10)
    assert (
        StartUploadSession.parse(
            {"session_id": "s1", "user_id": "u1", "total_photos": 1}
        ).total_photos
        == 1
    )
    assert (
        StartUploadSession.parse(
            {"session_id": "s1", "user_id": "u1", "total_photos": 10_000}
        ).total_photos
        == 10_000
    )


def test_parse_complete() -> None:
    assert CompletePhotoUpload.parse({"session_id": "s1", "photo_id": "p1"}) == CompletePhotoUpload(
        session_id="s1", photo_id="p1"
    )


def test_parse_fail() -> None:
    cmd = FailPhotoUpload.parse({"session_id": "s1", "photo_id": "p1", "reason": "corrupt file"})
    assert cmd == FailPhotoUpload(session_id="s1", photo_id="p1", reason="corrupt file")
    longest = "é" * MAX_REASON_LENGTH  # characters, not bytes
    assert (
        FailPhotoUpload.parse({"session_id": "s1", "photo_id": "p1", "reason": longest}).reason
        == longest
    )


START_OK = {"session_id": "s1", "user_id": "u1", "total_photos": 10}
COMPLETE_OK = {"session_id": "s1", "photo_id": "p1"}
FAIL_OK = {"session_id": "s1", "photo_id": "p1", "reason": "corrupt file"}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP: Any = object()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(START_OK, total_photos="10"), "total_photos must be an integer, got str"),
        (_with(START_OK, total_photos=10.0), "total_photos must be an integer, got float"),
        (_with(START_OK, total_photos=True), "total_photos must be an integer, got bool"),
        (_with(START_OK, total_photos=None), "total_photos must be an integer, got NoneType"),
        (_with(START_OK, total_photos=0), "total_photos must be between 1 and 10000, got 0"),
        (_with(START_OK, total_photos=-5), "total_photos must be between 1 and 10000, got -5"),
        (_with(START_OK, total_photos=10_001), "total_photos must be between 1 and 10000"),
        (_with(START_OK, session_id=5), "session_id must match"),
        (_with(START_OK, session_id="a:b"), "session_id must match"),
        (_with(START_OK, session_id="notifications"), "session_id must match"),
        (_with(START_OK, user_id="u 1"), "user_id must match"),
        (_with(START_OK, user_id=None), "user_id must match"),
        (_with(START_OK, total_photos=_DROP), "missing argument(s) total_photos"),
        ({}, "missing argument(s) session_id, user_id, total_photos"),
        (_with(START_OK, extra=1), "unexpected argument(s) extra"),
        (_with(START_OK, photo_id="p1"), "unexpected argument(s) photo_id"),
    ],
)
def test_parse_start_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        StartUploadSession.parse(kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(COMPLETE_OK, session_id=None), "session_id must match"),
        (_with(COMPLETE_OK, session_id="x" * 129), "session_id must match"),
        (_with(COMPLETE_OK, photo_id=1), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id="p*"), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id="ph\u00f6to"), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id=_DROP), "missing argument(s) photo_id"),
        (_with(COMPLETE_OK, reason="x"), "unexpected argument(s) reason"),
    ],
)
def test_parse_complete_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        CompletePhotoUpload.parse(kwargs)
    assert message in str(info.value)
    assert str(info.value).startswith(("complete_photo_upload", "session_id", "photo_id"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(FAIL_OK, reason=""), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason="   \n"), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason=None), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason=["x"]), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason="x" * 1025), "reason must be at most 1024 characters"),
        (_with(FAIL_OK, session_id="s{1}"), "session_id must match"),
        (_with(FAIL_OK, photo_id=""), "photo_id must match"),
        (_with(FAIL_OK, reason=_DROP), "missing argument(s) reason"),
        (_with(FAIL_OK, user_id="u1"), "unexpected argument(s) user_id"),
    ],
)
def test_parse_fail_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        FailPhotoUpload.parse(kwargs)
    assert message in str(info.value)


def test_reason_with_a_lone_surrogate_is_rejected() -> None:
    """Regression: a reason holding a lone surrogate (JSON ``"\\ud800"``, which the job codec
    carries happily) passed validation and would have reached the UTF-8 wire, where encoding the
    event fails; it is now an invalid command."""
    kwargs = json.loads('{"session_id":"s1","photo_id":"p1","reason":"bad \\ud800 byte"}')
    with pytest.raises(InvalidCommand, match="lone surrogates"):
        FailPhotoUpload.parse(kwargs)


def test_invalid_command_is_a_value_error() -> None:
    assert issubclass(InvalidCommand, ValueError)


# --- the JSON codec ------------------------------------------------------------------------------

JOB = {
    "t": 1,
    "f": "fail_photo_upload",
    "a": [],
    "k": {"session_id": "s1", "photo_id": "p1", "reason": "fichier corrompu / été"},
    "et": 1764213600000,
}


def test_serialize_job_is_utf8_json_never_pickle() -> None:
    raw = serialize_job(JOB)
    assert isinstance(raw, bytes)
    assert raw.startswith(b"{")
    assert not raw.startswith(b"\x80")  # pickle's protocol marker
    assert json.loads(raw.decode("utf-8")) == JOB
    assert raw == (
        b'{"t":1,"f":"fail_photo_upload","a":[],"k":{"session_id":"s1","photo_id":"p1",'
        b'"reason":"fichier corrompu / \\u00e9t\\u00e9"},"et":1764213600000}'
    )


def test_codec_round_trip() -> None:
    assert deserialize_job(serialize_job(JOB)) == JOB


def test_codec_round_trip_through_arq() -> None:
    """arq's own (de)serialisation functions, with our codec plugged in, agree with the layout."""
    raw = arq.jobs.serialize_job(
        "complete_photo_upload",
        (),
        {"session_id": "s1", "photo_id": "p1"},
        None,
        1764213600000,
        serializer=serialize_job,
    )
    assert json.loads(raw) == {
        "t": None,
        "f": "complete_photo_upload",
        "a": [],
        "k": {"session_id": "s1", "photo_id": "p1"},
        "et": 1764213600000,
    }
    job = arq.jobs.deserialize_job(raw, deserializer=deserialize_job)
    assert job.function == "complete_photo_upload"
    assert job.kwargs == {"session_id": "s1", "photo_id": "p1"}
    assert job.enqueue_time == dt.datetime(2025, 11, 27, 3, 20, tzinfo=dt.UTC)


def test_exception_results_become_job_errors() -> None:
    raw = arq.jobs.serialize_result(
        "start_upload_session",
        (),
        {"session_id": "s1", "user_id": "u1", "total_photos": 0},
        1,
        1764213600000,
        False,
        InvalidCommand("total_photos must be between 1 and 10000, got 0"),
        1764213600001,
        1764213600002,
        "ref",
        QUEUE_NAME,
        "job-1",
        serializer=serialize_job,
    )
    assert raw is not None
    data = json.loads(raw)
    assert data["r"] == {
        EXCEPTION_KEY: "InvalidCommand",
        "message": "total_photos must be between 1 and 10000, got 0",
    }
    result = arq.jobs.deserialize_result(raw, deserializer=deserialize_job)
    assert result.success is False
    assert isinstance(result.result, JobError)
    assert result.result.exc_type == "InvalidCommand"
    assert result.result.message == "total_photos must be between 1 and 10000, got 0"
    assert str(result.result) == "InvalidCommand: total_photos must be between 1 and 10000, got 0"


def test_results_of_other_types() -> None:
    @attrs.frozen
    class Outcome:
        changed: bool
        event_id: str | None

    when = dt.datetime(2026, 11, 27, 3, 20, tzinfo=dt.UTC)
    raw = serialize_job({"r": [Outcome(changed=True, event_id="1-0"), when, None]})
    assert json.loads(raw) == {
        "r": [{"changed": True, "event_id": "1-0"}, "2026-11-27T03:20:00+00:00", None]
    }


def test_unserializable_result_is_an_error_arq_can_report() -> None:
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        serialize_job({"r": object()})


def test_exception_marker_inside_kwargs_stays_data() -> None:
    """Regression: the decoder turned *every* nested dict holding ``__exception__`` into a
    ``JobError`` (an ``object_hook``), so a job's own kwargs could be replaced by an exception.
    Only a result (``r``) is revived now."""
    raw = b'{"t":1,"f":"fail_photo_upload","a":[],"k":{"reason":{"__exception__":"X"}},"et":1}'
    assert deserialize_job(raw)["k"] == {"reason": {"__exception__": "X"}}


@pytest.mark.parametrize("raw", [b"[]", b'"job"', b"1", b"null"])
def test_deserialize_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        deserialize_job(raw)
    with pytest.raises(arq.jobs.DeserializationError):
        arq.jobs.deserialize_job(raw, deserializer=deserialize_job)


@pytest.mark.parametrize("raw", [b"", b"\x80\x04\x95", b"{not json", b"\xff\xfe"])
def test_deserialize_rejects_garbage_and_pickle(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (json's and UnicodeDecodeError alike)
        deserialize_job(raw)


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
    import asyncio

    from rapidphoto_contract.jobs import UploadJobsClient

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
