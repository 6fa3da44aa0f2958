"""Redis memory one upload session costs, measured with the real worker (docs/operations.md).

    uv run python loadtests/session_memory.py                # 100 and 1,000 photos, 0 % and 10 % failed
    uv run python loadtests/session_memory.py --photos 5000 --fail-ratio 0.5

For each case a real ``rapidphoto-worker`` process runs the jobs (so the keys are exactly what its Lua
scripts write), then ``MEMORY USAGE <key> SAMPLES 0`` (every element counted, not sampled) is read for
each of the session's keys, the owner's notification log, and arq's job results, which arq keeps for
an hour (``keep_result``) after each job. Uses ``--redis-url`` (default ``REDIS_URL``), or without
one a private ``redis-server`` on a free port; each case runs in an emptied database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_tools.client import UploadJobsClient

# Run as a script (`python loadtests/<name>.py`): make the repository root importable for
# tests.support, which holds the one way this project starts a private redis-server.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.redis_server import private_redis, with_db

BIN = Path(sys.executable).parent
#: A typical failure reason: what the upload pipeline reports (PROTOCOL §3 allows up to 1024 characters).
REASON = "checksum mismatch after upload"


@dataclass
class Case:
    photos: int
    fail_ratio: float


@dataclass
class Measurement:
    case: Case
    keys: dict[str, int]  # key role -> bytes
    log_entries: int
    results: int  # arq results kept for an hour
    result_bytes: int

    @property
    def session_bytes(self) -> int:
        return sum(v for k, v in self.keys.items() if k != "notifications")


async def wait_for(
    redis: aioredis.Redis, session_id: str, status: str, worker: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 120
    while await redis.hget(keys.session_state_key(session_id), keys.STATE_STATUS) != status:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"session {session_id} never reached {status}")
        await asyncio.sleep(0.05)


async def memory(redis: aioredis.Redis, key: str) -> int:
    value = await redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")  # type: ignore[no-untyped-call]
    return int(value or 0)


@contextmanager
def running_worker(url: str, session_log_maxlen: int) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``rapidphoto-worker`` on ``url``; its log goes to a file (a pipe nobody reads would
    fill up with one line per job and stall it)."""
    env = {**os.environ, "REDIS_URL": url, "SESSION_LOG_MAXLEN": str(session_log_maxlen)}
    with tempfile.TemporaryDirectory(prefix="rapidphoto-memory-") as workdir:
        with (Path(workdir) / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [str(BIN / "rapidphoto-worker")], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            yield worker
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)


async def measure(url: str, case: Case, worker: subprocess.Popen[bytes]) -> Measurement:
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    session, user = f"s-{uuid.uuid4().hex[:12]}", f"u-{uuid.uuid4().hex[:12]}"
    async with UploadJobsClient.connect(url) as jobs:
        await jobs.start_upload_session(session, user, total_photos=case.photos)
        await wait_for(redis, session, "IN_PROGRESS", worker)
        failures = round(case.photos * case.fail_ratio)
        for n in range(case.photos):
            # Photo ids as an upload pipeline might make them: 36-character UUIDs.
            photo = str(uuid.UUID(int=n))
            if n < failures:
                await jobs.fail_photo_upload(session, photo, REASON)
            else:
                await jobs.complete_photo_upload(session, photo)
        await wait_for(redis, session, "COMPLETED", worker)
    roles = {
        "state": keys.session_state_key(session),
        "photos": keys.session_photos_key(session),
        "failures": keys.session_failures_key(session),
        "log": keys.session_log_key(session),
        "notifications": keys.user_notifications_log_key(user),
    }
    sizes = {role: await memory(redis, key) for role, key in roles.items()}
    results = [key async for key in redis.scan_iter(match="arq:result:*", count=1000)]
    result_bytes = sum([await memory(redis, key) for key in results])
    log_entries = int(await redis.xlen(roles["log"]))
    await redis.aclose()
    return Measurement(case, sizes, log_entries, len(results), result_bytes)


def report(rows: list[Measurement], redis_version: str) -> str:
    lines = [
        f"Redis {redis_version}; MEMORY USAGE ... SAMPLES 0, bytes per key.",
        "",
        "| photos | failed | state | photos hash | failures zset | log (entries) | session total "
        "| per photo | notifications log | arq results (1 h) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        failed = round(m.case.photos * m.case.fail_ratio)
        lines.append(
            f"| {m.case.photos:,} | {failed:,} | {m.keys['state']:,} | {m.keys['photos']:,} "
            f"| {m.keys['failures']:,} | {m.keys['log']:,} ({m.log_entries:,}) "
            f"| {m.session_bytes:,} | {m.session_bytes / m.case.photos:,.0f} "
            f"| {m.keys['notifications']:,} | {m.result_bytes:,} ({m.results:,}) |"
        )
    return "\n".join(lines)


def run(url: str, cases: list[Case], session_log_maxlen: int) -> None:
    db_url = with_db(url, 15)
    rows = []
    for case in cases:
        with redis.Redis.from_url(db_url) as client:
            client.flushdb()
        with running_worker(db_url, session_log_maxlen) as worker:
            rows.append(asyncio.run(measure(db_url, case, worker)))
    with redis.Redis.from_url(db_url) as client:
        client.flushdb()
        version = str(client.info("server").get("redis_version"))
    print(report(rows, version))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    parser.add_argument("--photos", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--fail-ratio", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--session-log-maxlen", type=int, default=1000)
    args = parser.parse_args()
    cases = [Case(p, f) for f in args.fail_ratio for p in args.photos]
    if args.redis_url:
        run(args.redis_url, cases, args.session_log_maxlen)
    else:
        with private_redis() as url:
            run(url, cases, args.session_log_maxlen)


if __name__ == "__main__":
    main()
