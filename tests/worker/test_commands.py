"""rapidphoto_worker.commands against a real Redis: PROTOCOL §3's rules, one by one.

Every test checks the state after the command and, through :class:`Harness.expect`, that exactly the
expected events were appended and published, once each, byte-identical to the contract's encoding.
"""

from __future__ import annotations

import json

import arq
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from rapidphoto_contract import keys
from rapidphoto_contract.events import (
    KIND_UPLOAD_SESSION_COMPLETED,
    Event,
    Notification,
    PhotoFailed,
    PhotoUploaded,
    SessionCompleted,
    SessionStarted,
)
from rapidphoto_contract.jobs import (
    CompletePhotoUpload,
    FailPhotoUpload,
    StartUploadSession,
)
from rapidphoto_worker import commands
from rapidphoto_worker.commands import CommandResult
from rapidphoto_worker.context import WorkerContext
from rapidphoto_worker.errors import SessionConflict, SessionNotFound, TooManyPhotos
from tests.support.redis_server import RedisServer
from tests.support.worker import (
    notification_log,
    our_keys,
    session_log,
    worker_context,
    worker_settings,
)
from tests.worker.conftest import SESSION, USER, Harness

IN_PROGRESS, COMPLETED = "IN_PROGRESS", "COMPLETED"


def uploaded(
    photo: str, total: int, up: int, failed: int, status: str = IN_PROGRESS
) -> PhotoUploaded:
    return PhotoUploaded(
        session_id=SESSION,
        photo_id=photo,
        total_photos=total,
        uploaded_photos=up,
        failed_photos=failed,
        progress_percent=100 * (up + failed) // total,
        status=status,
    )


def failed(
    photo: str, reason: str, total: int, up: int, fail: int, status: str = IN_PROGRESS
) -> PhotoFailed:
    return PhotoFailed(
        session_id=SESSION,
        photo_id=photo,
        reason=reason,
        total_photos=total,
        uploaded_photos=up,
        failed_photos=fail,
        progress_percent=100 * (up + fail) // total,
        status=status,
    )


def started(total: int) -> SessionStarted:
    return SessionStarted(
        session_id=SESSION,
        total_photos=total,
        uploaded_photos=0,
        failed_photos=0,
        progress_percent=0,
        status=IN_PROGRESS,
    )


def completed(total: int, up: int, fail: int) -> SessionCompleted:
    return SessionCompleted(
        session_id=SESSION,
        total_photos=total,
        uploaded_photos=up,
        failed_photos=fail,
        progress_percent=100,
        status=COMPLETED,
    )


def notification(total: int, up: int, fail: int) -> Notification:
    return Notification(
        kind=KIND_UPLOAD_SESSION_COMPLETED,
        user_id=USER,
        session_id=SESSION,
        total_photos=total,
        uploaded_photos=up,
        failed_photos=fail,
    )


def state(
    total: int, up: int, fail: int, status: str = IN_PROGRESS, fseq: int = 0
) -> dict[str, str]:
    return {
        keys.STATE_OWNER: USER,
        keys.STATE_TOTAL: str(total),
        keys.STATE_UPLOADED: str(up),
        keys.STATE_FAILED: str(fail),
        keys.STATE_STATUS: status,
        keys.STATE_FAILURE_SEQ: str(fseq),
    }


# --- start_upload_session -------------------------------------------------------------------------


async def test_start_creates_the_session_and_publishes_session_started(h: Harness) -> None:
    result = await h.start(3)

    assert await h.state() == state(3, 0, 0)
    ids = await h.expect([started(3)])
    assert result == CommandResult(outcome="applied", event_ids=tuple(ids))
    assert result.to_dict() == {"outcome": "applied", "eventIds": ids}


async def test_start_again_with_the_same_owner_and_total_changes_nothing(h: Harness) -> None:
    await h.start(3)
    await h.expect([started(3)])

    result = await h.start(3)

    assert result == commands.DUPLICATE
    assert result.to_dict() == {"outcome": "duplicate", "eventIds": []}
    assert await h.state() == state(3, 0, 0)
    await h.expect([])


@pytest.mark.parametrize(("user", "total"), [("u2", 3), (USER, 4), ("u2", 4)])
async def test_start_with_another_owner_or_total_fails_and_changes_nothing(
    h: Harness, user: str, total: int
) -> None:
    await h.start(3)
    await h.upload("p1")
    await h.expect([started(3), uploaded("p1", 3, 1, 0)])

    with pytest.raises(SessionConflict, match="another owner or total_photos"):
        await h.start(total, user=user)

    assert await h.state() == state(3, 1, 0)
    await h.expect([])


# --- complete_photo_upload / fail_photo_upload ----------------------------------------------------


async def test_upload_marks_the_photo_and_publishes_photo_uploaded(h: Harness) -> None:
    await h.start(3)
    await h.expect([started(3)])

    result = await h.upload("p1")

    assert await h.state() == state(3, 1, 0)
    assert await h.photos() == {"p1": keys.PHOTO_UPLOADED_MARK}
    assert result.event_ids == tuple(await h.expect([uploaded("p1", 3, 1, 0)]))


async def test_an_upload_delivered_twice_counts_and_publishes_once(h: Harness) -> None:
    await h.start(3)
    await h.upload("p1")
    await h.expect([started(3), uploaded("p1", 3, 1, 0)])

    assert await h.upload("p1") == commands.DUPLICATE

    assert await h.state() == state(3, 1, 0)
    await h.expect([])


async def test_fail_marks_the_photo_and_publishes_photo_failed(h: Harness) -> None:
    await h.start(3)
    await h.expect([started(3)])

    result = await h.fail("p1", "checksum mismatch")

    assert await h.state() == state(3, 0, 1, fseq=1)
    assert await h.photos() == {"p1": "F:checksum mismatch"}
    assert await h.failures() == [("p1", 1.0)]
    assert result.event_ids == tuple(await h.expect([failed("p1", "checksum mismatch", 3, 0, 1)]))


async def test_failures_are_ordered_by_when_they_failed(h: Harness) -> None:
    await h.start(5)
    for photo in ("c", "a", "b"):
        await h.fail(photo)

    assert await h.failures() == [("c", 1.0), ("a", 2.0), ("b", 3.0)]
    assert (await h.state())[keys.STATE_FAILURE_SEQ] == "3"


async def test_a_failed_photo_later_uploaded_moves_from_failed_to_uploaded(h: Harness) -> None:
    await h.start(3)
    await h.fail("p1", "timeout")
    await h.fail("p2", "timeout")
    await h.expect([started(3), failed("p1", "timeout", 3, 0, 1), failed("p2", "timeout", 3, 0, 2)])

    await h.upload("p1")

    assert await h.state() == state(3, 1, 1, fseq=2)
    assert await h.photos() == {"p1": keys.PHOTO_UPLOADED_MARK, "p2": "F:timeout"}
    assert await h.failures() == [("p2", 2.0)]  # p1 left the list of current failures
    await h.expect([uploaded("p1", 3, 1, 1)])


async def test_an_uploaded_photo_reported_failed_changes_nothing(h: Harness) -> None:
    await h.start(3)
    await h.upload("p1")
    await h.expect([started(3), uploaded("p1", 3, 1, 0)])

    assert await h.fail("p1", "late failure") == commands.DUPLICATE

    assert await h.state() == state(3, 1, 0)
    assert await h.photos() == {"p1": keys.PHOTO_UPLOADED_MARK}
    assert await h.failures() == []
    await h.expect([])


async def test_a_failed_photo_reported_failed_again_changes_nothing_not_even_the_reason(
    h: Harness,
) -> None:
    """Documented choice: the first failure stands (clients saw it); a redelivery or a later report
    of the same outcome publishes nothing."""
    await h.start(3)
    await h.fail("p1", "first")
    await h.expect([started(3), failed("p1", "first", 3, 0, 1)])

    assert await h.fail("p1", "first") == commands.DUPLICATE
    assert await h.fail("p1", "second") == commands.DUPLICATE

    assert await h.state() == state(3, 0, 1, fseq=1)
    assert await h.photos() == {"p1": "F:first"}
    await h.expect([])


# --- completion -----------------------------------------------------------------------------------


async def test_the_session_completes_exactly_once_with_one_notification(h: Harness) -> None:
    await h.start(3)
    await h.upload("p1")
    await h.fail("p2", "corrupt")
    await h.expect([started(3), uploaded("p1", 3, 1, 0), failed("p2", "corrupt", 3, 1, 1)])

    result = await h.upload("p3")

    assert await h.state() == state(3, 2, 1, COMPLETED, fseq=1)
    session_ids = await h.expect(
        # The photo event still says IN_PROGRESS; SESSION_COMPLETED is the transition.
        [uploaded("p3", 3, 2, 1), completed(3, 2, 1)],
        [notification(3, 2, 1)],
    )
    assert result.event_ids == tuple(session_ids[:2])
    assert result.notification_id == session_ids[2]
    assert result.completed
    assert result.to_dict() == {
        "outcome": "applied",
        "eventIds": session_ids[:2],
        "notificationId": session_ids[2],
    }

    # After completion: the failed photo is uploaded after all; counts move, no second completion.
    again = await h.upload("p2")
    assert not again.completed
    assert await h.state() == state(3, 3, 0, COMPLETED, fseq=1)
    await h.expect([uploaded("p2", 3, 3, 0, COMPLETED)])

    # Duplicates of a completed session's photos, and new photos beyond the total, change nothing.
    assert await h.upload("p3") == commands.DUPLICATE
    with pytest.raises(TooManyPhotos):
        await h.upload("p4")
    await h.expect([])


async def test_a_session_of_one_failed_photo_completes(h: Harness) -> None:
    await h.start(1)
    await h.expect([started(1)])

    await h.fail("p1", "unreadable")

    assert (await h.state())[keys.STATE_STATUS] == COMPLETED
    await h.expect(
        [failed("p1", "unreadable", 1, 0, 1), completed(1, 0, 1)], [notification(1, 0, 1)]
    )


# --- too many photos ------------------------------------------------------------------------------


async def test_more_distinct_photos_than_the_total_fail_and_change_nothing(h: Harness) -> None:
    await h.start(2)
    await h.upload("p1")
    await h.fail("p2", "x")
    events: list[Event] = [
        started(2),
        uploaded("p1", 2, 1, 0),
        failed("p2", "x", 2, 1, 1),
        completed(2, 1, 1),
    ]
    await h.expect(events, [notification(2, 1, 1)])
    before = (await h.state(), await h.photos(), await h.failures())

    with pytest.raises(TooManyPhotos, match="'p3'"):
        await h.upload("p3")
    with pytest.raises(TooManyPhotos):
        await h.fail("p3", "x")

    assert (await h.state(), await h.photos(), await h.failures()) == before
    await h.expect([])
    # Photos already counted are still fine: a duplicate, and a failed photo now uploaded.
    assert await h.upload("p1") == commands.DUPLICATE
    await h.upload("p2")
    await h.expect([uploaded("p2", 2, 2, 0, COMPLETED)])


# --- a session that does not exist (yet) ----------------------------------------------------------


async def test_a_photo_for_an_unknown_session_is_retried_with_growing_backoff(
    app: WorkerContext, redis_client: aioredis.Redis
) -> None:
    cmd = CompletePhotoUpload(session_id="later", photo_id="p1")
    defers = []
    for job_try in (1, 2, 3, 6, 7, 8):
        with pytest.raises(arq.Retry) as info:
            await commands.complete_photo_upload(app, cmd, job_try=job_try)
        assert info.value.defer_score is not None
        defers.append(info.value.defer_score / 1000)
    # 50 ms, 100 ms, 200 ms ... capped at 2 s, each jittered down by at most 20 %.
    for defer, nominal in zip(defers, [0.05, 0.1, 0.2, 1.6, 2.0, 2.0], strict=True):
        assert nominal * 0.8 - 0.001 <= defer <= nominal + 0.001
    assert await our_keys(redis_client) == []


async def test_after_the_window_a_photo_for_an_unknown_session_fails_clearly(
    app: WorkerContext, redis_client: aioredis.Redis
) -> None:
    last_retry = max(n for n in range(1, 100) if commands.min_waited_seconds(n) < 10)
    reason = FailPhotoUpload(session_id="never", photo_id="p1", reason="x")
    with pytest.raises(arq.Retry):
        await commands.fail_photo_upload(app, reason, job_try=last_retry)

    with pytest.raises(SessionNotFound, match=r"session 'never' does not exist.*at least 1\d s"):
        await commands.fail_photo_upload(app, reason, job_try=last_retry + 1)
    assert await our_keys(redis_client) == []


def test_the_retry_window_covers_at_least_ten_seconds_of_backoff() -> None:
    """PROTOCOL §3: "retried with backoff for at least 10 s". The lower bound counts only the smallest
    delays the jitter can pick, so the real time from the first try is always longer."""
    assert commands.SESSION_WAIT_SECONDS >= 10
    tries = max(n for n in range(1, 100) if commands.min_waited_seconds(n) < 10) + 1
    assert commands.min_waited_seconds(tries) >= 10
    # ... and gives up well within arq's max_tries, which also covers transient errors.
    assert tries < commands.MAX_TRIES
    # The nominal delays (what the retries take on average, up to jitter) add up to about 12 s.
    nominal = sum(commands.backoff_seconds(n) for n in range(1, tries))
    assert 10 <= nominal <= 14


async def test_the_wait_window_can_be_shortened(
    app: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "SESSION_WAIT_SECONDS", 0.0)
    with pytest.raises(SessionNotFound):
        await commands.complete_photo_upload(app, CompletePhotoUpload(session_id="x", photo_id="p"))


async def test_a_session_started_again_by_someone_else_notifies_its_new_owner(
    h: Harness, redis_client: aioredis.Redis
) -> None:
    """The completion's notification goes to the owner the session has when it completes: one
    that expired and was started again by another user notifies the new one."""
    await h.start(2)
    await h.upload("p1")
    await redis_client.delete(*keys.session_keys(SESSION))  # as if it expired
    await h.start(1, user="u2")

    result = await h.upload("p2")

    assert result.completed
    assert await redis_client.xlen(keys.user_notifications_log_key("u2")) == 1
    assert await redis_client.xlen(keys.user_notifications_log_key(USER)) == 0


# --- the completion's steps (PROTOCOL §9) ---------------------------------------------------------


async def _step_one(h: Harness, photo: str) -> list[str]:
    """Only the photo script, as a worker that dies right after it leaves things."""
    app = h.app
    return list(
        await app.state.run(
            app.scripts.complete_photo_upload,
            keys.session_keys(SESSION),
            [
                app.state.publish,
                SESSION,
                photo,
                commands.occurred_at(),
                1000,
                3600,
                keys.session_channel(SESSION),
            ],
        )
    )


async def test_a_worker_dead_after_the_first_step_leaves_the_notification_pending_and_the_retry_writes_it_once(
    h: Harness, redis_client: aioredis.Redis
) -> None:
    await h.start(1)
    reply = await _step_one(h, "p1")
    assert reply[:2] == ["applied", USER]
    assert reply[2]  # the mark is in the reply
    pending = await redis_client.hget(
        keys.session_state_key(SESSION), keys.STATE_PENDING_NOTIFICATION
    )
    assert pending == reply[2]
    assert await redis_client.xlen(keys.user_notifications_log_key(USER)) == 0

    retried = await h.upload("p1")  # the job again: a duplicate, which finishes the completion
    again = await h.upload("p1")

    assert retried.outcome == "duplicate"
    assert retried.notification_id is not None
    assert again.notification_id is None  # the mark is gone: nothing more to do
    notes = await notification_log(redis_client, USER)
    assert [entry_id for entry_id, _, _ in notes] == [retried.notification_id]
    note = json.loads(notes[0][2])
    completed_id = reply[2].split(" ")[0]
    assert (note["sessionId"], note["totalPhotos"], note["uploadedPhotos"]) == (SESSION, 1, 1)
    assert completed_id == reply[4]  # the SESSION_COMPLETED of the first step
    state = await h.state()
    assert keys.STATE_PENDING_NOTIFICATION not in state


async def test_a_worker_dead_between_the_second_and_third_steps_writes_nothing_twice(
    h: Harness, redis_client: aioredis.Redis
) -> None:
    await h.start(1)
    reply = await _step_one(h, "p1")
    app = h.app
    # Step 2 by hand, as the dead worker ran it; then the mark is still there.
    first = await commands._notify_step(app, SESSION, USER, reply[2])
    assert await redis_client.hexists(
        keys.session_state_key(SESSION), keys.STATE_PENDING_NOTIFICATION
    )

    retried = await h.upload("p1")

    assert retried.notification_id == first
    assert [e for e, _, _ in await notification_log(redis_client, USER)] == [first]
    assert not await redis_client.hexists(
        keys.session_state_key(SESSION), keys.STATE_PENDING_NOTIFICATION
    )


# --- transient errors -----------------------------------------------------------------------------


async def test_a_transient_redis_error_is_retried_and_redis_coming_back_works(
    own_redis: RedisServer,
) -> None:
    async with worker_context(worker_settings(own_redis.url)) as app:
        start = commands.start_upload_session
        cmd_start = StartUploadSession(session_id=SESSION, user_id=USER, total_photos=2)
        await start(app, cmd_start)
        own_redis.kill()
        cmd = CompletePhotoUpload(session_id=SESSION, photo_id="p1")

        with pytest.raises(arq.Retry) as info:
            await commands.complete_photo_upload(app, cmd, job_try=1)
        assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
        # On the last try the real error fails the job, so its result says what happened.
        with pytest.raises(redis_errors.ConnectionError):
            await commands.complete_photo_upload(app, cmd, job_try=commands.MAX_TRIES)

        own_redis.start()  # empty: no data, no scripts loaded
        with pytest.raises(arq.Retry):  # the session is gone with the data: not started yet
            await commands.complete_photo_upload(app, cmd)
        # EVALSHA finds no script on the new server; redis-py loads it again (NOSCRIPT fallback).
        assert (await start(app, cmd_start)).outcome == "applied"
        assert (await commands.complete_photo_upload(app, cmd)).outcome == "applied"


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ConnectionError("refused"),
        redis_errors.TimeoutError("slow"),
        redis_errors.BusyLoadingError("loading"),
        redis_errors.ReadOnlyError("replica"),
        redis_errors.TryAgainError("slot moving"),
        # Redis out of memory refuses a script before its first write (issue 9's fault matrix
        # found such jobs failed for good, lost)
        redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
    ],
)
def test_transient_errors_become_a_retry(error: Exception) -> None:
    with pytest.raises(arq.Retry), commands._retry_transient(job_try=1):
        raise error


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.AuthenticationError("wrong password"),
        redis_errors.ResponseError("WRONGTYPE"),
        ValueError("a bug"),
    ],
)
def test_other_errors_are_not_retried(error: Exception) -> None:
    with pytest.raises(type(error)), commands._retry_transient(job_try=1):
        raise error


# --- TTL and trimming -----------------------------------------------------------------------------


async def test_every_change_refreshes_the_ttl_of_all_the_session_keys(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with worker_context(worker_settings(redis_url, session_ttl_seconds=100)) as app:
        h = Harness(app, redis_client)
        state_key, photos_key, failures_key, log_key = keys.session_keys(SESSION)
        user_log = keys.user_notifications_log_key(USER)

        async def ttls(*names: str) -> list[int]:
            return [await redis_client.ttl(name) for name in names]

        async def shorten() -> None:
            for name in (state_key, photos_key, failures_key, log_key, user_log):
                await redis_client.expire(name, 5)

        await h.start(3)
        assert all(95 <= t <= 100 for t in await ttls(state_key, log_key))

        await h.fail("p1")
        await shorten()
        await h.upload("p2")
        assert all(95 <= t <= 100 for t in await ttls(state_key, photos_key, failures_key, log_key))

        await shorten()
        assert await h.upload("p2") == commands.DUPLICATE  # no change, no refresh
        assert all(t <= 5 for t in await ttls(state_key, photos_key, failures_key, log_key))

        await h.upload("p3")  # completes: the notification log gets the TTL too
        assert all(95 <= t <= 100 for t in await ttls(state_key, photos_key, log_key, user_log))


async def test_the_session_log_is_trimmed_approximately(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with worker_context(worker_settings(redis_url, session_log_maxlen=10)) as app:
        h = Harness(app, redis_client)
        await h.start(600)
        for n in range(500):
            await h.upload(f"p{n}")

        length = await redis_client.xlen(keys.session_log_key(SESSION))
        # Redis trims whole stream nodes (100 entries by default): never fewer than asked for.
        assert 10 <= length <= 200
        entries = await session_log(redis_client, SESSION)
        assert len(entries) == length
        assert '"photoId":"p499"' in entries[-1][2]  # trimming takes the oldest entries only
        assert entries[0][1] == "PHOTO_UPLOADED"


# --- entry ids and encoding -----------------------------------------------------------------------


async def test_entry_ids_keep_increasing_when_the_clock_is_behind_the_log(
    h: Harness, redis_client: aioredis.Redis
) -> None:
    """The scripts choose entry ids themselves (the payload carries its own id): after an entry
    from the future (a clock that went back), the next id continues from it."""
    future = "99999999999999-5"
    await redis_client.xadd(keys.session_log_key(SESSION), {"type": "X", "data": "{}"}, id=future)
    h._seen[keys.session_log_key(SESSION)] = 1

    result = await h.start(2)
    await h.upload("p1")

    ids = await h.expect([started(2), uploaded("p1", 2, 1, 0)])
    assert result.event_ids == (ids[0],)
    assert ids == ["99999999999999-6", "99999999999999-7"]


async def test_two_events_of_one_script_get_increasing_ids(h: Harness) -> None:
    """Usually in the same millisecond (then the sequence goes up by one), but the clock may tick
    between them. The same-millisecond rule itself is pinned by the test above, where every id
    falls in the (future) millisecond of the newest entry."""
    await h.start(1)
    await h.expect([started(1)])

    result = await h.upload("p1")  # PHOTO_UPLOADED and SESSION_COMPLETED in one script

    photo_ms, photo_seq = (int(x) for x in result.event_ids[0].split("-"))
    done_ms, done_seq = (int(x) for x in result.event_ids[1].split("-"))
    same_ms = (done_ms, done_seq) == (photo_ms, photo_seq + 1)
    later_ms = done_ms > photo_ms and done_seq == 0
    assert same_ms or later_ms, result.event_ids
    await h.expect([uploaded("p1", 1, 1, 0), completed(1, 1, 0)], [notification(1, 1, 0)])


@pytest.mark.parametrize(
    "reason",
    [
        "a/b",  # cjson would write a\/b
        'quote " and backslash \\ and \\/',
        "new\nline\ttab\r\x00\x01\x1f",
        "DEL \x7f",  # cjson would write \u007f
        "non-ASCII: é ü 日本語 🙂",
        "line sep \u2028 para sep \u2029",
        "</script><script>alert(1)</script>",
        "x" * 1024,
    ],
)
async def test_failure_reasons_are_published_exactly_as_the_contract_encodes_them(
    h: Harness, reason: str
) -> None:
    await h.start(2)
    await h.expect([started(2)])

    await h.fail("p1", reason)

    await h.expect([failed("p1", reason, 2, 0, 1)])
    assert await h.photos() == {"p1": keys.PHOTO_FAILED_PREFIX + reason}


async def test_longest_ids_pass_through(h: Harness, redis_client: aioredis.Redis) -> None:
    photo = "P" * 128
    await h.start(1)
    await h.expect([started(1)])
    await h.upload(photo)
    await h.expect([uploaded(photo, 1, 1, 0), completed(1, 1, 0)], [notification(1, 1, 0)])
