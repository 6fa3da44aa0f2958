"""Fixtures shared by the whole suite: a real Redis per test, tokens, process starters."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.support.redis_server import RedisServer, shared_redis_url, with_db

TEST_SECRET = "test-secret-at-least-32-bytes-long-0123456789"

# Databases 1..15 rotate between tests; 0 is left alone for people sharing a dev Redis.
_dbs = itertools.cycle(range(1, 16))


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
