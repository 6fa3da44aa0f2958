"""The load tests' upload pipeline: sessions, then photo outcomes at a steady rate, via the real worker.

    python -m loadtests.publisher --redis-url URL --prefix lt1 --sessions 1000 --rate 100 \\
        --start-delay 11 --stop-at EPOCH

Run by the locustfile as a subprocess (asyncio and arq stay out of locust's gevent process). It
enqueues ``start_upload_session`` for ``<prefix>-s<i>`` owned by ``<prefix>-u<i>`` with
:class:`~rapidphoto_tools.client.UploadJobsClient`, waits until the worker has created every
session, prints ``{"event": "ready"}``, then ``--start-delay`` seconds later (time for the
viewers to connect) sends photo outcomes round robin
over the sessions at ``--rate`` per second (absolute schedule: job *k* at ``start + k / rate``, so
a slow enqueue does not lower the rate), until ``--stop-at`` or every planned photo is sent. Each
job changes state, so each is one event on a session channel. ``total_photos`` is one more than the
photos sent, so no session completes (and closes its streams) during a run.

Every line on stdout is one JSON object; the last one is ``{"event": "done", ...}``. Bounded: at
most ``--sessions`` x ``--photos`` jobs, never past ``--stop-at``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from typing import Any

from loadtests.names import session_id, user_id

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import MAX_TOTAL_PHOTOS
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.simulation import FAILURE_REASONS

#: Start jobs in flight at once while creating sessions.
START_CONCURRENCY = 50
#: How long the worker gets to create every session before the run is called off.
READY_TIMEOUT_SECONDS = 60.0


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def photos_needed(rate: float, seconds: float, sessions: int) -> int:
    """Photos per session so that ``rate`` can be held for ``seconds`` (at least 1)."""
    return max(1, min(MAX_TOTAL_PHOTOS - 1, math.ceil(rate * max(seconds, 0.0) / sessions) + 1))


async def start_sessions(jobs: UploadJobsClient, prefix: str, sessions: int, total: int) -> None:
    sem = asyncio.Semaphore(START_CONCURRENCY)

    async def one(n: int) -> None:
        async with sem:
            await jobs.start_upload_session(session_id(prefix, n), user_id(prefix, n), total)

    await asyncio.gather(*(one(n) for n in range(sessions)))
    pending = {session_id(prefix, n) for n in range(sessions)}
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(pending)} session(s) not created after {READY_TIMEOUT_SECONDS:g}s "
                "(is rapidphoto-worker running on this REDIS_URL?)"
            )
        batch = sorted(pending)
        async with jobs.pool.pipeline(transaction=False) as pipe:
            for sid in batch:
                pipe.exists(keys.session_state_key(sid))
            found = await pipe.execute()
        pending -= {sid for sid, exists in zip(batch, found, strict=True) if exists}
        if pending:
            await asyncio.sleep(0.1)


async def send_photos(
    jobs: UploadJobsClient,
    args: argparse.Namespace,
    photos: int,
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    if args.start_delay > 0:
        await asyncio.sleep(args.start_delay)
    t0 = time.monotonic()
    stop = t0 + max(0.0, args.stop_at - time.time())
    sent = failed = 0
    worst_behind = 0.0
    next_report = t0 + 10
    total = photos * args.sessions
    for k in range(total):
        due = t0 + k / args.rate
        now = time.monotonic()
        if due >= stop:
            break
        if due > now:
            await asyncio.sleep(due - now)
        else:
            worst_behind = max(worst_behind, now - due)
        n, photo = k % args.sessions, k // args.sessions + 1
        sid, pid = session_id(args.prefix, n), f"photo-{photo}"
        if rng.random() < args.failure_ratio:
            await jobs.fail_photo_upload(sid, pid, rng.choice(FAILURE_REASONS))
            failed += 1
        else:
            await jobs.complete_photo_upload(sid, pid)
        sent += 1
        if time.monotonic() >= next_report:
            elapsed = time.monotonic() - t0
            emit("progress", sent=sent, seconds=round(elapsed, 1), rate=round(sent / elapsed, 1))
            next_report += 10
    elapsed = time.monotonic() - t0
    return {
        "sent": sent,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "rate": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "worst_behind_ms": round(worst_behind * 1000, 1),
    }


async def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    photos = 1
    if args.rate > 0:
        # Planned from now: the start phase only shortens the window, never lengthens it.
        photos = photos_needed(args.rate, args.stop_at - time.time(), args.sessions)
    async with UploadJobsClient.connect(args.redis_url) as jobs:
        # total = photos + 1: the session never completes during the run (its streams stay open).
        await start_sessions(jobs, args.prefix, args.sessions, photos + 1)
        emit("ready", sessions=args.sessions, seconds=round(time.monotonic() - t0, 2))
        if args.rate <= 0:
            emit("done", sent=0, failed=0, seconds=0.0, rate=0.0, worst_behind_ms=0.0)
            return 0
        report = await send_photos(jobs, args, photos)
    emit("done", **report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True, help="session ids <prefix>-s<n>")
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--rate", type=float, default=100.0, help="photo outcomes (events) per s")
    parser.add_argument(
        "--start-delay", type=float, default=0.0, help="seconds from ready to the first photo"
    )
    parser.add_argument("--stop-at", type=float, required=True, help="epoch s: send nothing later")
    parser.add_argument("--failure-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 100_000:
        parser.error("--sessions must be 1..100000")
    if args.stop_at - time.time() > 3600:
        parser.error("--stop-at is more than an hour away: every load loop is bounded")
    try:
        return asyncio.run(run(args))
    except Exception as exc:  # reported to the locustfile, which fails the run
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
