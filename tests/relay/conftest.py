"""Relay fixtures: a private Redis and a shared relay process for the module, plus a factory for
relays with their own settings. Tests use fresh ids (``ids``) so they never see each other's data."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from rapidphoto_contract.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.support.processes import ManagedProcess, start_relay
from tests.support.redis_server import RedisServer, free_port
from tests.support.seed import Seeder, seeder


class Relay:
    """A running relay process and how to talk to it."""

    def __init__(self, proc: ManagedProcess, port: int, redis_url: str, secret: str) -> None:
        self.proc = proc
        self.port = port
        self.redis_url = redis_url
        self.secret = secret
        self.base_url = f"http://127.0.0.1:{port}"

    def token(self, user_id: str, ttl: float = 3600, **kwargs: Any) -> str:
        return mint_token(user_id, key=self.secret, ttl_seconds=ttl, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=10, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics (0 when absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0


@pytest.fixture(scope="session")
def relay_redis() -> Iterator[RedisServer]:
    """A private Redis for the relay suite (the shared relay outlives any one test's database)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def relay_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay-logs")


@pytest.fixture(scope="session")
def relay(relay_redis: RedisServer, relay_logs: Path) -> Iterator[Relay]:
    """The shared relay: default settings except a 1 s heartbeat."""
    port = free_port()
    proc = start_relay(
        relay_redis.url,
        port,
        relay_logs,
        name="relay-shared",
        JWT_SECRET=TEST_SECRET,
        SSE_HEARTBEAT_SECONDS="1",
    )
    try:
        yield Relay(proc, port, relay_redis.url, TEST_SECRET)
    finally:
        proc.stop()
        assert_no_token_in(proc.log())


RelayFactory = Callable[..., Relay]


@pytest.fixture
def relay_factory(log_dir: Path, relay_redis: RedisServer) -> Iterator[RelayFactory]:
    """Start relays with their own settings (stopped at teardown): ``relay_factory(X="1")``."""
    started: list[ManagedProcess] = []
    names = itertools.count()

    def start(redis_url: str | None = None, ready: bool = True, **env: str) -> Relay:
        port = free_port()
        env.setdefault("JWT_SECRET", TEST_SECRET)
        url = redis_url or relay_redis.url
        proc = start_relay(url, port, log_dir, name=f"relay-{next(names)}", ready=ready, **env)
        started.append(proc)
        return Relay(proc, port, url, env["JWT_SECRET"])

    yield start
    for proc in started:
        proc.stop()
        assert_no_token_in(proc.log())


def assert_no_token_in(log: str) -> None:
    """PROTOCOL §5: the query token is redacted from every log line (JWTs start with ``ey``)."""
    assert "access_token=ey" not in log
    assert "Bearer ey" not in log


@pytest.fixture
def ids() -> Callable[[str], str]:
    """Fresh ids: ``ids("s")`` -> ``s-3f2a...``."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def seed(relay_redis: RedisServer) -> AsyncIterator[Seeder]:
    async with seeder(relay_redis.url) as s:
        yield s


@pytest.fixture
async def rclient(relay_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(relay_redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(
    predicate: Callable[[], bool], within: float = 10.0, what: str = "condition"
) -> None:
    """Like ``wait_until`` but yields to the event loop between polls (sockets may need to close)."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)
