"""Fixtures of the tools' tests against real relays: two relay processes on a private Redis,
shared by the package (the stream client's tests and ``rapidphoto watch``'s), with a 100 ms
``retry:``, a 1 s heartbeat and two streams per user. Tests use fresh ids."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from rapidphoto_contract.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.support.processes import ManagedProcess, start_relay
from tests.support.redis_server import RedisServer, free_port
from tests.support.seed import Seeder, seeder

RELAY_ENV = {
    "JWT_SECRET": TEST_SECRET,
    "SSE_RETRY_MS": "100",
    "SSE_HEARTBEAT_SECONDS": "1",
    "RELAY_MAX_CONNECTIONS_PER_USER": "2",
}


class Relays:
    def __init__(self, redis: RedisServer, log_dir: Path) -> None:
        self.redis = redis
        self.log_dir = log_dir
        self.ports = [free_port(), free_port()]
        with ThreadPoolExecutor(2) as pool:  # each takes seconds to import: start both at once
            self.procs = list(pool.map(self._start, range(2)))

    def _start(self, n: int) -> ManagedProcess:
        env = cast("dict[str, Any]", RELAY_ENV)  # start_relay's own ``ready`` is a bool
        return start_relay(self.redis.url, self.ports[n], self.log_dir, f"relay-{n}", **env)

    def url(self, n: int) -> str:
        if not self.procs[n].running():  # killed by an earlier test
            self.procs[n] = self._start(n)
        return f"http://127.0.0.1:{self.ports[n]}"


@pytest.fixture(scope="package")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relays]:
    server = RedisServer()
    server.start()
    try:
        pair = Relays(server, tmp_path_factory.mktemp("relays"))
        try:
            yield pair
        finally:
            for proc in pair.procs:
                proc.stop()
    finally:
        server.stop()


@pytest.fixture
async def seed(relays: Relays) -> AsyncIterator[Seeder]:
    async with seeder(relays.redis.url) as s:
        yield s


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token(user: str, ttl: float = 3600) -> str:
    return mint_token(user, key=TEST_SECRET, ttl_seconds=ttl)
