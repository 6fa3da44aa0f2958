"""The relay's read client (round_trips.py) against a real Redis: commands issued together share
one pipeline and are answered each as alone, errors included; a lone command goes alone; a
cancelled caller disturbs no other; an unreachable Redis fails every caller with a Redis error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options
from rapidphoto_relay.round_trips import SharedRoundTrips
from tests.support.redis_server import RedisServer, free_port

Ids = Callable[[str], str]


def client(url: str) -> SharedRoundTrips:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=4, timeout=5, socket_timeout=5, **pool_options(retries=1)
    )
    return SharedRoundTrips(connection_pool=cancel_safe(pool))


@pytest.fixture
async def shared(relay_redis: RedisServer) -> AsyncIterator[SharedRoundTrips]:
    redis = client(relay_redis.url)
    try:
        yield redis
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_concurrent_commands_share_a_round_trip_and_get_their_own_answers(
    shared: SharedRoundTrips, ids: Ids
) -> None:
    keys = [ids("log") for _ in range(50)]
    for n, key in enumerate(keys[:25]):
        await shared.xadd(key, {"data": f"v{n}"})
    await shared.hset(ids("h"), "owner", "u1")
    before = shared.shared_commands
    replies: list[Any] = await asyncio.gather(
        *(shared.xrevrange(k, "+", "-", count=1) for k in keys)
    )
    assert [len(r) for r in replies] == [1] * 25 + [0] * 25
    assert [r[0][1] for r in replies[:25]] == [{b"data": f"v{n}".encode()} for n in range(25)]
    assert shared.shared_commands - before == 50


async def test_a_failing_command_fails_alone(shared: SharedRoundTrips, ids: Ids) -> None:
    text, log = ids("text"), ids("log")
    await shared.set(text, "not a stream")
    await shared.xadd(log, {"data": "x"})
    ok, wrong, also_ok = await asyncio.gather(
        shared.xrange(log), shared.xrange(text), shared.get(text), return_exceptions=True
    )
    assert isinstance(wrong, ResponseError)
    assert "WRONGTYPE" in str(wrong)
    assert isinstance(ok, list)
    assert len(ok) == 1
    assert also_ok == b"not a stream"


async def test_scripts_in_a_shared_round_trip_load_themselves(
    shared: SharedRoundTrips, ids: Ids
) -> None:
    script = shared.register_script(f"return ARGV[1] .. '{ids('script')}'")  # not loaded yet
    replies = await asyncio.gather(*(script(args=[str(n)]) for n in range(5)), shared.ping())
    assert [r[:1] for r in replies[:5]] == [str(n).encode() for n in range(5)]


async def test_a_lone_command_goes_alone(shared: SharedRoundTrips) -> None:
    trips = shared.shared_round_trips
    assert await shared.ping()
    assert shared.shared_round_trips == trips


async def test_a_cancelled_caller_disturbs_no_other(shared: SharedRoundTrips, ids: Ids) -> None:
    key = ids("k")
    await shared.set(key, "v")
    doomed = asyncio.ensure_future(shared.get(key))
    others = [asyncio.ensure_future(shared.get(key)) for _ in range(3)]
    await asyncio.sleep(0)
    doomed.cancel()
    assert await asyncio.gather(*others) == [b"v"] * 3
    assert doomed.cancelled()
    assert await shared.get(key) == b"v"  # the connection is still in step


async def test_an_unreachable_redis_fails_every_caller() -> None:
    redis = client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        replies = await asyncio.gather(
            *(redis.xrevrange(f"k{n}", "+", "-", count=1) for n in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, RedisConnectionError) for r in replies)
    finally:
        await redis.aclose(close_connection_pool=True)
