"""Redis commands a cancellation always stops (issue 9, fault 3), against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import TimeoutError as RedisTimeoutError

from rapidphoto_contract.redis_cancel import cancel_safe, raise_if_cancelled
from tests.support.cancellation import assert_cancellation_lands_at_every_step
from tests.support.redis_server import RedisServer


async def test_a_command_cancelled_at_any_loop_step_ends_its_task(redis_url: str) -> None:
    """redis-py writes each command under ``asyncio.wait_for`` (the pool's ``socket_timeout``),
    which on Python 3.11 swallows a cancellation arriving in the loop step in which the write
    completes (CPython gh-86296): the command returned normally and the task went on, so a
    relay's hub or a worker cancelled at that moment never stopped. Cancelled at every step of a
    command loop in turn, every task must end cancelled."""
    pool = cancel_safe(ConnectionPool.from_url(redis_url, socket_timeout=5))
    client = aioredis.Redis(connection_pool=pool)

    async def poll_forever() -> None:
        for _ in iter(int, 1):
            await client.hmget("k", ["a", "b"])

    try:
        await assert_cancellation_lands_at_every_step(poll_forever)
        assert await client.ping()  # and the pool still works
    finally:
        await client.aclose(close_connection_pool=True)


async def test_a_write_that_cannot_finish_still_times_out(own_redis: RedisServer) -> None:
    """The replacement write keeps redis-py's contract: past ``socket_timeout`` a write Redis does
    not take (here: Redis stopped, the socket buffers full) raises ``redis.TimeoutError``."""
    client = aioredis.Redis(
        connection_pool=cancel_safe(ConnectionPool.from_url(own_redis.url, socket_timeout=0.5))
    )
    assert own_redis.proc is not None
    try:
        assert await client.ping()  # connected before Redis stops
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError, match="writing"):
                await client.set("big", b"x" * (32 << 20))
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert await client.ping()  # a new connection replaces the one given up
        # The given-up connection closes once its buffered bytes are out: wait until Redis sees
        # only the new one, or its socket is reported unclosed at exit.
        async with asyncio.timeout(10):
            for _ in iter(int, 1):
                if len(await client.client_list()) == 1:
                    break
                await asyncio.sleep(0.05)
    finally:
        await client.aclose(close_connection_pool=True)


async def test_a_swallowed_cancellation_is_raised_again() -> None:
    """Pending cancellation requests are withdrawn only by ``uncancel()``: code that swallows one
    leaves it pending, and :func:`raise_if_cancelled` raises it where the loop checks."""
    checked = asyncio.Event()

    async def swallows_then_checks() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # what the buggy library did
            await asyncio.sleep(10)
        checked.set()
        raise_if_cancelled()

    task = asyncio.create_task(swallows_then_checks())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert checked.is_set()
    raise_if_cancelled()  # this task was never cancelled: nothing to raise
