"""The simulated upload pipeline: a pure, seeded plan; paced sending; waiting on session state."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from typing import Any

import attrs
import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import InvalidCommand
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.simulation import (
    FAILURE_REASONS,
    ApplyWatch,
    SimulationSpec,
    owners,
    plan_simulation,
    run_simulation,
    session_ids,
    wait_until_applied,
)
from tests.support.arq_queue import aqueued_jobs
from tests.support.cancellation import assert_cancellation_lands_at_every_step

SPEC = SimulationSpec(sessions=3, photos=20, rate=1000, failure_ratio=0.25, seed=7, user="alice")


def spec(**changes: Any) -> SimulationSpec:
    return attrs.evolve(SPEC, **changes)


# --- the plan ------------------------------------------------------------------------------------


def test_plan_is_deterministic_for_a_seed() -> None:
    assert plan_simulation(SPEC) == plan_simulation(spec())
    assert plan_simulation(spec(seed=8)) != plan_simulation(SPEC)


def test_plan_golden_for_seed_7() -> None:
    """Pinned: the same seed gives the same run on every machine and Python version (3.11+)."""
    plan = plan_simulation(SPEC)
    assert plan.failures == 12
    assert plan.expected() == {"sim-7-1": (18, 2), "sim-7-2": (15, 5), "sim-7-3": (15, 5)}
    assert [(o.session_id, o.photo_id, o.reason) for o in plan.outcomes[:6]] == [
        ("sim-7-1", "photo-1", None),
        ("sim-7-2", "photo-1", "upload timed out"),
        ("sim-7-3", "photo-1", None),
        ("sim-7-1", "photo-2", "virus scan failed"),
        ("sim-7-2", "photo-2", "virus scan failed"),
        ("sim-7-3", "photo-2", None),
    ]


def test_plan_shape() -> None:
    plan = plan_simulation(SPEC)
    assert [s.session_id for s in plan.sessions] == ["sim-7-1", "sim-7-2", "sim-7-3"]
    assert {s.user_id for s in plan.sessions} == {"alice"}
    assert {s.total_photos for s in plan.sessions} == {20}
    assert len(plan.outcomes) == 3 * 20
    per_session = Counter(o.session_id for o in plan.outcomes)
    assert per_session == {"sim-7-1": 20, "sim-7-2": 20, "sim-7-3": 20}
    for sid in per_session:
        photos = [o.photo_id for o in plan.outcomes if o.session_id == sid]
        assert photos == [f"photo-{n}" for n in range(1, 21)]  # each once, in order
    assert {o.reason for o in plan.outcomes if o.failed} <= set(FAILURE_REASONS)
    assert plan.duplicates == 0


def test_sessions_progress_round_robin() -> None:
    plan = plan_simulation(spec(sessions=2, photos=2))
    assert [(o.session_id, o.photo_id) for o in plan.outcomes] == [
        ("sim-7-1", "photo-1"),
        ("sim-7-2", "photo-1"),
        ("sim-7-1", "photo-2"),
        ("sim-7-2", "photo-2"),
    ]


@pytest.mark.parametrize(("ratio", "failures"), [(0.0, 0), (1.0, 60)])
def test_failure_ratio_extremes(ratio: float, failures: int) -> None:
    assert plan_simulation(spec(failure_ratio=ratio)).failures == failures


def test_failure_count_follows_the_ratio() -> None:
    plan = plan_simulation(spec(sessions=10, photos=1000, failure_ratio=0.2))
    assert 0.18 * 10_000 < plan.failures < 0.22 * 10_000


def test_failures_do_not_depend_on_duplicates() -> None:
    """Turning on duplicates must not reshuffle which photos fail (a fixed number of draws)."""
    plain = plan_simulation(SPEC)
    noisy = plan_simulation(spec(duplicates=0.5))
    assert [o.reason for o in noisy.outcomes] == [o.reason for o in plain.outcomes]
    assert 0 < noisy.duplicates < len(noisy.outcomes)
    assert plan_simulation(spec(duplicates=1.0)).duplicates == len(plain.outcomes)


def test_owners() -> None:
    assert owners("u", 1) == ["u"]
    assert owners("u", 3) == ["u-1", "u-2", "u-3"]
    plan = plan_simulation(spec(sessions=5, users=2))
    assert [s.user_id for s in plan.sessions] == ["alice-1", "alice-2"] * 2 + ["alice-1"]


def test_session_ids() -> None:
    assert session_ids(42, 2) == ["sim-42-1", "sim-42-2"]
    assert session_ids(42, 2, "demo") == ["demo-1", "demo-2"]
    plan = plan_simulation(spec(sessions=2, session_prefix="demo-7"))
    assert [s.session_id for s in plan.sessions] == ["demo-7-1", "demo-7-2"]
    # The prefix names the sessions only: outcomes are the seed's all the same.
    assert [o.reason for o in plan.outcomes] == [
        o.reason for o in plan_simulation(spec(sessions=2)).outcomes
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sessions": 0}, "sessions must be between"),
        ({"photos": 0}, "photos must be between 1 and 10000"),
        ({"photos": 10_001}, "photos must be between 1 and 10000"),
        ({"rate": 0}, "rate must be a positive"),
        ({"rate": float("nan")}, "rate must be a positive"),
        ({"failure_ratio": -0.1}, "failure ratio"),
        ({"failure_ratio": 1.1}, "failure ratio"),
        ({"duplicates": 2}, "duplicates"),
        ({"users": 4}, "users must be between 1 and the number of sessions"),
        ({"seed": -1}, "seed"),
        ({"user": "a:b"}, "user_id must match"),
        ({"user": "a" * 127, "users": 2}, "user_id must match"),  # "a...a-1" is 129 characters
    ],
)
def test_bad_specs(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        plan_simulation(spec(**changes))


# --- sending and waiting, against a real Redis ---------------------------------------------------


async def test_run_sends_every_job_paced(redis_url: str, redis_client: aioredis.Redis) -> None:
    rate = 50.0
    plan = plan_simulation(spec(sessions=2, photos=10, rate=rate))
    out = io.StringIO()
    started, started_ms = time.monotonic(), time.time() * 1000  # (arq's scores: epoch ms)
    async with UploadJobsClient.connect(redis_url) as jobs:
        report = await run_simulation(plan, jobs, rate, out, progress_every=0.1)
    took = time.monotonic() - started

    queued = await aqueued_jobs(redis_client)
    starts = [j for j in queued if j.function == "start_upload_session"]
    photos = sorted(
        (j for j in queued if j.function != "start_upload_session"), key=lambda j: j.score
    )
    assert len(starts) == 2
    assert len(photos) == 20
    assert report.photos == report.photo_jobs == 20
    assert report.failures == plan.failures
    # 20 jobs at 50/s: the last is due 19/50 s after the first; none goes early.
    assert took >= 19 / rate
    span_ms = photos[-1].score - photos[0].score
    assert span_ms >= 0.9 * 19 / rate * 1000
    # Paced, not bursty: the k-th job is never sent before its time, k/rate after the start. (An
    # upper bound, "no 100 ms window holds more than 8", failed on a busy machine: a pacer that
    # was descheduled sends what is overdue at once, by design, to keep the rate.)
    for k, job in enumerate(photos):
        assert job.score >= started_ms + k / rate * 1000 - 5, f"job {k} went early"
    # Sessions are started before any of their photos is sent.
    assert max(j.score for j in starts) <= photos[0].score
    assert "sent " in out.getvalue()  # progress lines


async def test_run_sends_duplicates_as_separate_jobs(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    plan = plan_simulation(spec(sessions=1, photos=5, duplicates=1.0))
    async with UploadJobsClient.connect(redis_url) as jobs:
        report = await run_simulation(plan, jobs, 1000, io.StringIO())
    assert (report.photos, report.photo_jobs) == (5, 10)
    photo_jobs = [
        j for j in await aqueued_jobs(redis_client) if j.function != "start_upload_session"
    ]
    assert len({j.job_id for j in photo_jobs}) == 10
    assert Counter(j.kwargs["photo_id"] for j in photo_jobs) == {
        f"photo-{n}": 2 for n in range(1, 6)
    }


async def _apply(redis_client: aioredis.Redis, sid: str, uploaded: int, failed: int) -> None:
    """Play the worker's part: write a session's counts where the worker keeps them."""
    await redis_client.hset(
        keys.session_state_key(sid),
        mapping={keys.STATE_UPLOADED: uploaded, keys.STATE_FAILED: failed},
    )


async def test_wait_returns_once_every_session_matches(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    watch = ApplyWatch(expected={"s1": (3, 1), "s2": (4, 0)})
    await _apply(redis_client, "s1", 3, 1)
    await _apply(redis_client, "s2", 1, 0)  # not there yet

    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        await _apply(redis_client, "s2", 4, 0)

    async with UploadJobsClient.connect(redis_url) as jobs:
        task = asyncio.create_task(finish_later())
        started = time.monotonic()
        async with asyncio.timeout(5):
            await wait_until_applied(jobs, watch, io.StringIO(), poll=0.02)
        await task
    assert 0.25 <= time.monotonic() - started < 2
    assert watch.pending() == {}


async def test_wait_reports_what_is_pending_on_timeout(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    watch = ApplyWatch(expected={"s1": (3, 1), "s2": (4, 0), "s3": (1, 0)})
    await _apply(redis_client, "s1", 3, 1)
    await _apply(redis_client, "s2", 2, 1)  # differs from the plan: never "applied"
    out = io.StringIO()
    async with UploadJobsClient.connect(redis_url) as jobs:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await wait_until_applied(jobs, watch, out, poll=0.02, progress_every=0.1)
    assert watch.pending() == {"s2": (2, 1), "s3": None}
    assert "waiting for the worker: 1/3 sessions applied" in out.getvalue()


async def test_wait_ends_when_cancelled_at_any_point_of_its_polling(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Issue 9, fault 3: this file's timeout test hung once until pytest's 120 s timeout. redis-py
    writes each command under ``asyncio.wait_for``, which on Python 3.11 swallows a cancellation
    that arrives in the loop iteration in which the write completes (CPython gh-86296): the wait's
    ``asyncio.timeout`` never took effect and it polled forever, as ``rapidphoto simulate --wait
    --timeout`` could. Here the cancellation lands at every event-loop step of the first polls in
    turn, so the steps where it used to be swallowed are always hit."""
    await _apply(redis_client, "s1", 0, 0)  # never matches: only a cancellation ends the wait
    async with UploadJobsClient.connect(redis_url) as jobs:
        watch = ApplyWatch(expected={"s1": (1, 0), "s2": (1, 0)})
        await assert_cancellation_lands_at_every_step(
            lambda: wait_until_applied(jobs, watch, io.StringIO(), poll=0.001)
        )


async def test_wait_enforces_its_own_deadline(redis_url: str) -> None:
    """The wait's ``timeout`` is checked by its loop, so it holds even if a cancellation is lost
    in a library (issue 9, fault 3): ``rapidphoto simulate --wait --timeout`` relies on it."""
    watch = ApplyWatch(expected={"s1": (1, 0)})
    async with UploadJobsClient.connect(redis_url) as jobs:
        with pytest.raises(TimeoutError):
            await wait_until_applied(jobs, watch, io.StringIO(), poll=0.01, timeout=0.2)
    assert watch.pending() == {"s1": None}
