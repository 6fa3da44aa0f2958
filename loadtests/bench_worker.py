"""Worker throughput benchmark: commands/s end to end, and how busy Redis is meanwhile.

    uv run python loadtests/bench_worker.py --workers 1 --commands 20000

Starts N real ``rapidphoto-worker`` processes against ``--redis-url`` (default ``REDIS_URL``; without
one, a private ``redis-server`` on a free port), writes the jobs straight into arq's queue with
pipelines (the JSON layout of ``rapidphoto_contract.jobs``, as any pipeline may), and measures from
the first enqueue until every session's counts are final and every event has been received on the
session channels. Redis CPU is ``used_cpu_sys + used_cpu_user`` from INFO, as a share of one core
over the same wall time; worker CPU likewise from ``/proc``. On a shared machine the wall-clock
figure moves with everything else running; "per worker cpu-sec" (commands per second of worker CPU)
is the steadier one: what a worker process does when it has a core to itself.

Each session is one ``start_upload_session`` and ``--photos`` photo jobs (a ``--fail-ratio`` share of
them ``fail_photo_upload``); every job changes state, so every job publishes exactly one event, plus
one ``SESSION_COMPLETED`` per session.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    serialize_job,
)

# Run as a script (`python loadtests/<name>.py`): make the repository root importable for
# tests.support (the one way this project starts a private redis-server) and loadtests.bench.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.bench.procfs import proc_cpu
from tests.support.redis_server import private_redis

BIN = Path(sys.executable).parent
#: arq's key layout (arq.constants), which the contract documents as the wire format of a job.
JOB_KEY_PREFIX = "arq:job:"
JOB_EXPIRES_MS = 86_400_000


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """``url`` when given, else a private in-memory redis-server for the run."""
    if url:
        yield url
        return
    with private_redis() as private_url:
        yield private_url


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def build_jobs(
    run: str, sessions: int, photos: int, fail_ratio: float, now_ms: int
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(start jobs, photo jobs) as (job id, serialized job); photo jobs shuffled across sessions."""

    def job(name: str, kwargs: dict[str, Any]) -> tuple[str, bytes]:
        data: dict[str, Any] = {"t": None, "f": name, "a": [], "k": kwargs, "et": now_ms}
        return uuid.uuid4().hex, serialize_job(data)

    starts, photo_jobs = [], []
    for s in range(sessions):
        sid = f"{run}-s{s}"
        user = f"{run}-u{s % 10}"
        starts.append(
            job(START_UPLOAD_SESSION, {"session_id": sid, "user_id": user, "total_photos": photos})
        )
        for p in range(photos):
            if random.random() < fail_ratio:
                reason = "checksum mismatch"
                kwargs = {"session_id": sid, "photo_id": f"p{p}", "reason": reason}
                photo_jobs.append(job(FAIL_PHOTO_UPLOAD, kwargs))
            else:
                photo_jobs.append(
                    job(COMPLETE_PHOTO_UPLOAD, {"session_id": sid, "photo_id": f"p{p}"})
                )
    random.shuffle(photo_jobs)
    return starts, photo_jobs


async def enqueue(client: aioredis.Redis, jobs: list[tuple[str, bytes]], score: int) -> None:
    for i in range(0, len(jobs), 1000):
        async with client.pipeline(transaction=False) as pipe:
            for job_id, raw in jobs[i : i + 1000]:
                pipe.psetex(JOB_KEY_PREFIX + job_id, JOB_EXPIRES_MS, raw)
            pipe.zadd(QUEUE_NAME, {job_id: score for job_id, _ in jobs[i : i + 1000]})
            await pipe.execute()


async def count_events(url: str, pattern: str, expected: int, ready: asyncio.Event) -> int:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(pattern)
    ready.set()
    seen = 0
    try:
        while seen < expected:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                seen += 1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
    return seen


async def wait_done(client: aioredis.Redis, session_ids: list[str], photos: int) -> None:
    pending = list(session_ids)
    while pending:
        async with client.pipeline(transaction=False) as pipe:
            for sid in pending:
                pipe.hmget(keys.session_state_key(sid), keys.STATE_UPLOADED, keys.STATE_FAILED)
            rows = await pipe.execute()
        pending = [
            sid
            for sid, (up, failed) in zip(pending, rows, strict=True)
            if up is None or int(up) + int(failed) < photos
        ]
        if pending:
            await asyncio.sleep(0.02)


async def wait_queue_empty(client: aioredis.Redis, within: float) -> int:
    """Jobs left in the queue once it is empty, or after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left: int = await client.zcard(QUEUE_NAME)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.02)


def start_workers(
    n: int, url: str, log_dir: Path, argv: list[str]
) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    procs = []
    for i in range(n):
        log = (log_dir / f"worker{i}.log").open("wb")
        worker_argv = [arg.replace("{i}", str(i)) for arg in argv]
        procs.append(subprocess.Popen(worker_argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    deadline = time.monotonic() + 20
    for i, proc in enumerate(procs):
        path = log_dir / f"worker{i}.log"
        while "worker ready" not in path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"worker {i} did not start:\n{path.read_text(errors='replace')}")
            time.sleep(0.05)
    return procs


async def bench(args: argparse.Namespace, url: str, log_dir: Path) -> None:
    photos = args.photos
    sessions = max(1, round(args.commands / (photos + 1)))
    commands = sessions * (photos + 1)
    run = uuid.uuid4().hex[:8]
    starts, photo_jobs = build_jobs(run, sessions, photos, args.fail_ratio, int(time.time() * 1000))
    session_ids = [f"{run}-s{s}" for s in range(sessions)]

    procs = start_workers(args.workers, url, log_dir, shlex.split(args.worker_command))
    client = aioredis.Redis.from_url(url)
    sync_client = redis.Redis.from_url(url)
    try:
        ready = asyncio.Event()
        expected_events = commands + sessions  # one per command, plus SESSION_COMPLETED each
        counter = asyncio.create_task(
            count_events(url, f"{keys.SESSION_CHANNEL_PREFIX}{run}-*", expected_events, ready)
        )
        await ready.wait()

        cpu0 = [proc_cpu(p.pid) for p in procs]
        self_cpu0 = proc_cpu(os.getpid())
        host0 = host_cpu()
        redis_cpu0 = redis_cpu_seconds(sync_client)
        t0 = time.perf_counter()
        now_ms = int(time.time() * 1000)
        await enqueue(client, starts, now_ms - 1)  # starts first in queue order
        await enqueue(client, photo_jobs, now_ms)
        t_enqueued = time.perf_counter()
        await wait_done(client, session_ids, photos)
        events = await asyncio.wait_for(counter, timeout=60)
        elapsed = time.perf_counter() - t0
        redis_cpu = redis_cpu_seconds(sync_client) - redis_cpu0
        worker_cpu = [proc_cpu(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
        # arq removes a job from the queue just after its script ran: let the last ones finish.
        left = await wait_queue_empty(client, within=10)
        self_cpu = proc_cpu(os.getpid()) - self_cpu0
        host_busy, host_total = (b - a for a, b in zip(host0, host_cpu(), strict=True))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        await client.aclose()
        sync_client.close()

    print(f"workers              {args.workers}")
    print(f"commands             {commands} ({sessions} sessions x (1 start + {photos} photos))")
    print(f"enqueue              {t_enqueued - t0:.2f} s")
    print(f"end to end           {elapsed:.2f} s")
    print(f"throughput           {commands / elapsed:,.0f} commands/s")
    print(f"per worker           {commands / elapsed / args.workers:,.0f} commands/s")
    print(f"events received      {events} (expected {expected_events})")
    print(f"queue left           {left}")
    print(f"redis cpu            {100 * redis_cpu / elapsed:.0f}% of one core")
    print(
        "worker cpu           "
        + ", ".join(f"{100 * c / elapsed:.0f}%" for c in worker_cpu)
        + " of one core each"
    )
    print(f"bench cpu            {100 * self_cpu / elapsed:.0f}% of one core (this process)")
    print(
        f"host cpu             {100 * host_busy / host_total:.0f}% busy of {os.cpu_count()} cores"
    )
    # Less sensitive to other load on the machine than the wall-clock figure: what one fully busy
    # core would do at the CPU cost per command measured here.
    print(f"per worker cpu-sec   {commands / sum(worker_cpu):,.0f} commands (capacity of one core)")
    print(f"exit codes           {[p.returncode for p in procs]}")
    if events != expected_events or left:
        sys.exit("FAILED: not every command was applied and published")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--photos", type=int, default=999, help="photos per session (<= 10000)")
    parser.add_argument("--fail-ratio", type=float, default=0.1)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--log-dir", type=Path, help="keep worker logs here (default: temp dir)")
    parser.add_argument(
        "--worker-command",
        default=str(BIN / "rapidphoto-worker"),
        help="command starting one worker; {i} is replaced by its index, e.g. "
        "'python -m cProfile -o w{i}.prof -m rapidphoto_worker.main' to profile",
    )
    args = parser.parse_args()
    if not 1 <= args.photos <= 10_000:
        parser.error("--photos must be between 1 and 10000")
    with redis_server(args.redis_url) as url:
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            asyncio.run(bench(args, url, args.log_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
                asyncio.run(bench(args, url, Path(tmp)))


if __name__ == "__main__":
    main()
