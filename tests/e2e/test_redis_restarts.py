"""Redis restarts and killed connections, end to end: every Redis client of the product (the relays'
reads, the worker, the enqueue client, the CLI) goes on as if nothing happened once Redis is back.

The bug these tests pin down (issue 9, fault 2): after a Redis restart, or ``CLIENT KILL TYPE normal``
with Redis up, the first command on each pooled connection failed with "Connection closed by
server": a new stream got 503 (final for a browser's EventSource), an enqueue raised, and the
worker's arq loop stopped, stranding the jobs it held for 20 s. See rapidphoto_contract.redis_options.

Nothing here calls ``/health/ready`` between the fault and the requests that are checked: its PING
goes through the same pool and would quietly replace a dead connection first.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Final

import httpx
import pytest
import redis.asyncio as aioredis
from arq.jobs import Job
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from rapidphoto_contract.events import STATUS_COMPLETED, STATUS_IN_PROGRESS
from rapidphoto_contract.jobs import deserialize_job
from rapidphoto_tools.client import UploadJobsClient
from tests.e2e.conftest import (
    NOTIFICATION_STREAM,
    Cluster,
    Truth,
    eventually,
    fresh,
    gather_bounded,
    session_path,
    worker_outcomes,
)
from tests.support.processes import BIN, base_env
from tests.support.redis_server import RedisServer
from tests.support.sse import SSEStream

pytestmark = pytest.mark.e2e

ClusterFactory = Callable[[str], Cluster]

#: RELAY_MAX_CONNECTIONS_PER_USER: streams of one user per relay here (the default cap is 32).
MAX_PER_USER: Final = "200"
#: Streams opened at once to fill a relay's command pool before the fault.
WARM_UP_STREAMS = 20
STREAMS_PER_RELAY = 50
PHOTOS = 50
PUBSUB_CLIENT_NAME = "rapidphoto-relay:pubsub"


def _observer(redis_url: str) -> aioredis.Redis:
    """The test's own client (``str`` replies), with one quiet retry of its own: the faults here
    are aimed at the product's clients, and must not trip the test's reads."""
    return aioredis.Redis.from_url(redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1))


@contextlib.asynccontextmanager
async def _streams(
    base_url: str, path: str, token: str, count: int
) -> AsyncIterator[list[SSEStream]]:
    """``count`` streams opened at once (whatever their status), closed when the block ends. One
    HTTP client for all of them: a client each (``open_sse``) costs more than the relay's work."""
    headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(10.0, read=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        sent = await asyncio.gather(
            *(
                client.send(client.build_request("GET", path, headers=headers), stream=True)
                for _ in range(count)
            ),
            return_exceptions=True,
        )
        streams = [SSEStream(r) for r in sent if isinstance(r, httpx.Response)]
        try:
            errors = [r for r in sent if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            for stream in streams:
                if stream.status_code == 200:
                    stream.start()
                else:
                    stream.body = await stream.response.aread()
            yield streams
        finally:
            for stream in streams:
                await stream.aclose()


async def _statuses(base_url: str, path: str, token: str, count: int) -> list[int]:
    async with _streams(base_url, path, token, count) as streams:
        return [s.status_code for s in streams]


async def _kill_command_connections(redis_url: str) -> int:
    async with aioredis.Redis.from_url(redis_url) as admin:
        killed: int = await admin.client_kill_filter(_type="normal", skipme=True)
        return killed


async def _wait_resubscribed(redis_url: str, relays: int) -> None:
    """Until Redis sees every relay's pub/sub connection again: asked of Redis, not of the relays,
    whose readiness check would go through (and mend) the pool under test."""
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as admin:

        async def back() -> bool:
            clients = await admin.client_list()
            return sum(c.get("name") == PUBSUB_CLIENT_NAME for c in clients) == relays

        await eventually(back, f"{relays} relays subscribed again", within=20)


def _restart(server: RedisServer, *, keep_data: bool) -> None:
    """SIGKILL Redis and start it again on its port, from its last SAVE or empty."""
    server.kill()
    if not keep_data:
        (server.dir / "dump.rdb").unlink(missing_ok=True)
    server.start()


async def test_new_streams_get_200_after_client_kill(
    own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    """Issue 9, fault 2: ``CLIENT KILL TYPE normal`` with Redis up, then the next stream request
    on each relay got 503: redis-py 8.1 handed out the pooled connection Redis had closed
    (RESP3's maintenance notifications skip the check-out test, redis/redis-py#4252) and our
    hand-built pool had no retry. Every new stream must get 200."""
    cluster = cluster_factory(own_redis.url).start(
        relays=2, worker=False, RELAY_MAX_CONNECTIONS_PER_USER=MAX_PER_USER
    )
    token = cluster.token(fresh("u"))
    for relay in cluster.relays:  # several connections in each relay's command pool
        assert (
            await _statuses(relay.base_url, NOTIFICATION_STREAM, token, WARM_UP_STREAMS)
            == [200] * WARM_UP_STREAMS
        )
    assert await _kill_command_connections(own_redis.url) >= 2
    for relay in cluster.relays:
        # The very next request (it got 503), each kind, then many at once.
        assert await _statuses(relay.base_url, session_path(fresh("s")), token, 1) == [200]
        assert await _statuses(relay.base_url, NOTIFICATION_STREAM, token, 1) == [200]
        assert (
            await _statuses(relay.base_url, session_path(fresh("s")), token, WARM_UP_STREAMS)
            == [200] * WARM_UP_STREAMS
        )


async def test_two_redis_restarts_then_streams_and_jobs_as_usual(
    own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    """Redis restarted twice in a row, first from a SAVE (with its data), then empty; then 50 new
    streams on each relay all get 200 and see the session complete, and 50 photo jobs sent
    through an enqueue client connected before the restarts are all applied by the worker that
    lived through them."""
    cluster = cluster_factory(own_redis.url).start(
        relays=2, RELAY_MAX_CONNECTIONS_PER_USER=MAX_PER_USER
    )
    user = fresh("u")
    token = cluster.token(user)
    async with UploadJobsClient.connect(own_redis.url) as jobs, _observer(own_redis.url) as client:
        truth = Truth(client)
        earlier = fresh("s")
        await jobs.start_upload_session(earlier, user, 1)  # also leaves a pooled connection
        await truth.wait_status(earlier, STATUS_IN_PROGRESS)
        for relay in cluster.relays:
            statuses = await _statuses(relay.base_url, NOTIFICATION_STREAM, token, WARM_UP_STREAMS)
            assert statuses == [200] * WARM_UP_STREAMS
        for keep_data in (True, False):
            if keep_data:
                await client.save()
            _restart(own_redis, keep_data=keep_data)
            await _wait_resubscribed(own_redis.url, len(cluster.relays))
            assert (await truth.counts(earlier))[2] == (STATUS_IN_PROGRESS if keep_data else "")

        session = fresh("s")
        await jobs.start_upload_session(session, user, PHOTOS)
        async with (
            _streams(
                cluster.relays[0].base_url, session_path(session), token, STREAMS_PER_RELAY
            ) as first,
            _streams(
                cluster.relays[1].base_url, session_path(session), token, STREAMS_PER_RELAY
            ) as second,
        ):
            streams = first + second
            assert [s.status_code for s in streams] == [200] * len(streams)
            await gather_bounded(
                [partial(jobs.complete_photo_upload, session, f"p{n}") for n in range(PHOTOS)]
            )
            await truth.wait_counts(session, PHOTOS, 0, within=30)
            await truth.wait_status(session, STATUS_COMPLETED)
            ends = await asyncio.gather(
                *(s.until("SESSION_COMPLETED", timeout=30) for s in streams)
            )
            assert all(frames[-1].json()["uploadedPhotos"] == PHOTOS for frames in ends)


async def test_worker_enqueue_client_and_cli_after_client_kill(
    own_redis: RedisServer, cluster_factory: ClusterFactory
) -> None:
    """Issue 9, fault 2, the other clients: after ``CLIENT KILL TYPE normal`` an enqueue through
    an already connected client raised "Connection closed by server", and the worker's arq loop
    stopped ("lost Redis, restarting the worker"), leaving the jobs it held for 20 s. Every
    enqueue must succeed, the worker keep running, and every job succeed on its first try."""
    cluster = cluster_factory(own_redis.url).start(relays=0)
    worker = cluster.workers[0]
    session, user = fresh("s"), fresh("u")
    async with (
        UploadJobsClient.connect(own_redis.url) as jobs,
        _observer(own_redis.url) as client,
    ):
        truth = Truth(client)
        sent = [await jobs.start_upload_session(session, user, PHOTOS + 1)]
        # (Photo jobs before the session exists would be retried by design: try 2, not a fault.)
        await truth.wait_status(session, STATUS_IN_PROGRESS)
        sent += await gather_bounded(
            [partial(jobs.complete_photo_upload, session, f"a{n}") for n in range(10)]
        )
        await truth.wait_counts(session, 10, 0)  # the worker's connections are pooled now

        assert await _kill_command_connections(own_redis.url) >= 3  # worker x2, enqueue client
        sent += await gather_bounded(
            [partial(jobs.complete_photo_upload, session, f"b{n}") for n in range(PHOTOS - 10)]
        )
        await truth.wait_counts(session, PHOTOS, 0)

        # The CLI, right after another kill (its own connection is new; the worker's are not).
        await _kill_command_connections(own_redis.url)
        cli = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "rapidphoto"), "complete", session, "last"],
            env=base_env(own_redis.url),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        sent.append(Job(cli.stdout.strip(), jobs.pool, _deserializer=deserialize_job))
        await truth.wait_counts(session, PHOTOS + 1, 0)
        await truth.wait_status(session, STATUS_COMPLETED)

        async def all_finished() -> bool:
            results = [await job.result_info() for job in sent]
            return all(r is not None for r in results)

        await eventually(all_finished, "every job's result")
        results = [await job.result_info() for job in sent]
        assert [(r.success, r.job_try) for r in results if r is not None] == [(True, 1)] * len(sent)
    assert "lost Redis" not in worker.log()
    assert [o for o in worker_outcomes(worker) if o["outcome"] != "applied"] == []
    assert worker.running()
