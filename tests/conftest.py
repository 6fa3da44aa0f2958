"""Fixtures shared by the whole suite: a real Redis per test, tokens, process starters."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.support.redis_server import RedisServer, shared_redis_url, with_db

TEST_SECRET = "test-secret-at-least-32-bytes-long-0123456789"

#: scripts/test runs the suite on pytest-xdist workers (``-n``, ``--dist loadgroup``). The tests
#: that load the machine's cores by themselves (the soak, locust, the Redis fault matrix, Chromium,
#: a thousand streams, a worker crash under a burst of jobs) run one after another on one worker,
#: never two at once, so each keeps the headroom its pacing needs; as the biggest group they start
#: first, so this longest chain does not end the run last.
CPU_HEAVY = pytest.mark.xdist_group("cpu-heavy")


def _databases() -> list[int]:
    """Databases 1..15 rotate between tests; 0 is left alone for people sharing a dev Redis.
    Under pytest-xdist each worker rotates through its own share: with ``REDIS_URL`` set, all
    workers use that one server, and two tests flushing the same database would wipe each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ... (xdist's names)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = [db for db in range(1, 16) if db % count == int(worker.removeprefix("gw")) % count]
    if not share:
        raise RuntimeError(f"{count} xdist workers share 15 Redis databases: use -n 15 or fewer")
    return share


_dbs = itertools.cycle(_databases())


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    with shared_redis_url() as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A Redis database this test owns: empty at start, flushed again at the end."""
    url = with_db(redis_server_url, next(_dbs))
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private ``redis-server`` this test may kill and restart."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path
