"""A simulated upload pipeline (PROTOCOL §2, the people's CLI): N sessions x M photos at a rate.

Two halves, so the interesting part is testable without a clock or a Redis:

- :func:`plan_simulation` is pure: from a :class:`SimulationSpec` (and its seed) it derives every
  session, owner and photo outcome, in send order. The same spec always gives the same plan.
- :func:`run_simulation` enqueues a plan through :class:`UploadJobsClient`, pacing the photo jobs
  on an absolute schedule (job *k* at ``t0 + k / rate``), so the rate holds on average without
  drift and is never sent as one burst; :func:`wait_until_applied` then polls the sessions' state
  hashes until the worker has applied everything.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

import attrs

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import MAX_TOTAL_PHOTOS, InvalidCommand, StartUploadSession
from rapidphoto_contract.redis_cancel import raise_if_cancelled
from rapidphoto_tools.client import UploadJobsClient

#: Failure reasons drawn at random, so a demo shows more than one kind.
FAILURE_REASONS: Final = (
    "corrupt file",
    "unsupported format",
    "file too large",
    "virus scan failed",
    "upload timed out",
    "checksum mismatch",
)

#: Upper bound on sessions in one run: well past a load test's needs, short of a typo's 10**9.
MAX_SESSIONS: Final = 100_000


@attrs.frozen(kw_only=True)
class SimulationSpec:
    sessions: int
    photos: int
    rate: float  # photo outcomes per second, all sessions together (duplicates ride along)
    failure_ratio: float
    seed: int
    user: str
    users: int = 1
    duplicates: float = 0.0  # probability that a photo job is delivered twice
    session_prefix: str | None = None  # session ids are <prefix>-<n>; default sim-<seed>

    def check(self) -> None:
        """Raise :class:`InvalidCommand` naming the first bad parameter."""
        if not 1 <= self.sessions <= MAX_SESSIONS:
            raise InvalidCommand(f"sessions must be between 1 and {MAX_SESSIONS}")
        if not 1 <= self.photos <= MAX_TOTAL_PHOTOS:
            raise InvalidCommand(f"photos must be between 1 and {MAX_TOTAL_PHOTOS}")
        if not self.rate > 0:  # also rejects NaN
            raise InvalidCommand("rate must be a positive number of photos per second")
        if not 0 <= self.failure_ratio <= 1:
            raise InvalidCommand("failure ratio must be between 0 and 1")
        if not 0 <= self.duplicates <= 1:
            raise InvalidCommand("duplicates must be a probability between 0 and 1")
        if not 1 <= self.users <= self.sessions:
            raise InvalidCommand("users must be between 1 and the number of sessions")
        if self.seed < 0:
            raise InvalidCommand("seed must be a non-negative integer")


@attrs.frozen(kw_only=True)
class PhotoOutcome:
    session_id: str
    photo_id: str
    reason: str | None  # None: uploaded
    duplicate: bool  # enqueue the same outcome twice (idempotency exercise)

    @property
    def failed(self) -> bool:
        return self.reason is not None


@attrs.frozen(kw_only=True)
class SimulationPlan:
    sessions: tuple[StartUploadSession, ...]
    outcomes: tuple[PhotoOutcome, ...]  # in send order

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.failed)

    @property
    def duplicates(self) -> int:
        return sum(1 for o in self.outcomes if o.duplicate)

    def expected(self) -> dict[str, tuple[int, int]]:
        """Final ``(uploaded, failed)`` of each session once every job has been applied."""
        counts = {s.session_id: [0, 0] for s in self.sessions}
        for o in self.outcomes:
            counts[o.session_id][1 if o.failed else 0] += 1
        return {sid: (up, failed) for sid, (up, failed) in counts.items()}


def session_ids(seed: int, sessions: int, prefix: str | None = None) -> list[str]:
    """``<prefix>-<n>``, by default ``sim-<seed>-<n>``: a person can tell a run's sessions apart
    and find them again (and a demo page can be opened on them before the run starts)."""
    stem = f"sim-{seed}" if prefix is None else prefix
    return [f"{stem}-{n}" for n in range(1, sessions + 1)]


def owners(user: str, users: int) -> list[str]:
    """One owner is ``user`` itself; several are ``user-1`` ... ``user-K``."""
    return [user] if users == 1 else [f"{user}-{k}" for k in range(1, users + 1)]


def plan_simulation(spec: SimulationSpec) -> SimulationPlan:
    """Every job the run will send, derived from the spec alone (deterministic for a seed)."""
    spec.check()
    rng = random.Random(spec.seed)
    people = owners(spec.user, spec.users)
    starts = tuple(
        StartUploadSession.parse(
            {"session_id": sid, "user_id": people[i % len(people)], "total_photos": spec.photos}
        )
        for i, sid in enumerate(session_ids(spec.seed, spec.sessions, spec.session_prefix))
    )
    outcomes = []
    # Round robin: every session progresses at once, as concurrent uploads do.
    for n in range(1, spec.photos + 1):
        for start in starts:
            # Three draws per photo whatever the ratios, so failures depend on the seed only
            # (changing --duplicates does not reshuffle which photos fail).
            fail_roll, reason, dup_roll = rng.random(), rng.choice(FAILURE_REASONS), rng.random()
            outcomes.append(
                PhotoOutcome(
                    session_id=start.session_id,
                    photo_id=f"photo-{n}",
                    reason=reason if fail_roll < spec.failure_ratio else None,
                    duplicate=dup_roll < spec.duplicates,
                )
            )
    return SimulationPlan(sessions=starts, outcomes=tuple(outcomes))


@attrs.frozen(kw_only=True)
class RunReport:
    start_jobs: int
    photos: int  # photo outcomes sent
    photo_jobs: int  # the same, duplicates included
    failures: int
    elapsed: float  # seconds spent sending photo jobs

    @property
    def rate(self) -> float:
        """Photo outcomes per second achieved (compare with the requested rate)."""
        return self.photos / self.elapsed if self.elapsed > 0 else float(self.photos)


async def _enqueue_outcome(jobs: UploadJobsClient, outcome: PhotoOutcome) -> None:
    if outcome.reason is None:
        await jobs.complete_photo_upload(outcome.session_id, outcome.photo_id)
    else:
        await jobs.fail_photo_upload(outcome.session_id, outcome.photo_id, outcome.reason)


async def run_simulation(
    plan: SimulationPlan,
    jobs: UploadJobsClient,
    rate: float,
    out: TextIO,
    *,
    start_delay: float = 0.0,
    progress_every: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> RunReport:
    """Start every session, wait ``start_delay`` seconds (time to open a progress page on them),
    then send the photo outcomes at ``rate`` per second."""
    for start in plan.sessions:
        await jobs.start_upload_session(start.session_id, start.user_id, start.total_photos)
    if start_delay > 0:
        out.write(f"{len(plan.sessions)} session(s) started; first photo in {start_delay:g}s\n")
        out.flush()
        await asyncio.sleep(start_delay)
    total = len(plan.outcomes)
    sent = failed = 0
    t0 = clock()
    next_report = t0 + progress_every
    for k, outcome in enumerate(plan.outcomes):
        # Absolute schedule: a slow enqueue does not push every later job back (no drift).
        delay = t0 + k / rate - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await _enqueue_outcome(jobs, outcome)
        sent += 1
        if outcome.duplicate:
            await _enqueue_outcome(jobs, outcome)
            sent += 1
        failed += outcome.failed
        now = clock()
        if now >= next_report:
            out.write(
                f"sent {k + 1}/{total} photos ({failed} failed) "
                f"in {now - t0:.1f}s, {(k + 1) / (now - t0):.1f} photos/s\n"
            )
            out.flush()
            next_report = now + progress_every
    return RunReport(
        start_jobs=len(plan.sessions),
        photos=total,
        photo_jobs=sent,
        failures=failed,
        elapsed=clock() - t0,
    )


def _counts(raw: list[bytes | str | None]) -> tuple[int, int] | None:
    uploaded, failed = raw
    if uploaded is None or failed is None:
        return None  # not created yet
    try:
        return int(uploaded), int(failed)
    except ValueError:
        return None  # not ours to judge here: the plan's counts are never met, the wait says so


@attrs.define
class ApplyWatch:
    """What :func:`wait_until_applied` has seen so far; still readable after a timeout."""

    expected: Mapping[str, tuple[int, int]]
    seen: dict[str, tuple[int, int] | None] = attrs.Factory(dict)

    def pending(self) -> dict[str, tuple[int, int] | None]:
        """Sessions whose state differs from the plan, with their last seen counts."""
        return {
            sid: self.seen.get(sid)
            for sid, want in self.expected.items()
            if self.seen.get(sid) != want
        }


async def wait_until_applied(
    jobs: UploadJobsClient,
    watch: ApplyWatch,
    out: TextIO,
    *,
    poll: float = 0.2,
    progress_every: float = 1.0,
    timeout: float | None = None,  # noqa: ASYNC109 (its own deadline, see the docstring)
    clock: Callable[[], float] = time.monotonic,
    state: Any = None,
) -> None:
    """Poll each pending session's state hash until its counts are the plan's.

    ``state``: the client of the sessions' Redis (a ``RedisCluster`` in cluster mode, PROTOCOL §9);
    by default the queue's, which is the same server on a standalone Redis.

    Raises ``TimeoutError`` once ``timeout`` seconds have passed (then read ``watch``). The loop
    checks that deadline itself rather than rely only on a cancellation from ``asyncio.timeout``
    around it, which a library may swallow (issue 9, fault 3: redis-py on Python 3.11 did, and the
    wait polled forever; see :mod:`rapidphoto_contract.redis_cancel`).
    """
    deadline = None if timeout is None else clock() + timeout
    next_report = clock() + progress_every
    while True:
        for sid in watch.pending():
            raw = await (jobs.pool if state is None else state).hmget(
                keys.session_state_key(sid), [keys.STATE_UPLOADED, keys.STATE_FAILED]
            )
            raise_if_cancelled()
            watch.seen[sid] = _counts(raw)
        pending = len(watch.pending())
        if not pending:
            return
        now = clock()
        if deadline is not None and now >= deadline:
            raise TimeoutError(f"{pending} session(s) not applied after {timeout:g}s")
        if now >= next_report:
            done = len(watch.expected) - pending
            out.write(f"waiting for the worker: {done}/{len(watch.expected)} sessions applied\n")
            out.flush()
            next_report = now + progress_every
        await asyncio.sleep(poll if deadline is None else max(0.0, min(poll, deadline - now)))
