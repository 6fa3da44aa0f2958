"""Shutdown and Redis outages over real processes (PROTOCOL §5): SIGTERM closes every stream with
``shutdown`` within 5 s; streams survive a Redis restart on heartbeats and catch up from the log
without losing or repeating a logged event; a session lost with Redis's memory is closed."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

import httpx
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from tests.relay.conftest import RelayFactory, eventually
from tests.support.redis_server import RedisServer
from tests.support.seed import Seeder, seeder
from tests.support.sse import RawStream, SSEFrame, SSEStream, open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


def path(session_id: str) -> str:
    return f"/api/upload/sessions/{session_id}/stream"


def _ready(base_url: str) -> int:
    try:
        return httpx.get(base_url + "/health/ready", timeout=2).status_code
    except httpx.HTTPError:
        return 0


async def test_sigterm_closes_every_stream_with_shutdown_within_5s(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    relay = relay_factory()
    session, user = ids("s"), ids("u")
    await seed.start(session, user, 3)
    token = relay.token(user)
    async with (
        open_sse(relay.base_url, path(session), token=token) as live,
        open_sse(relay.base_url, NOTIFICATIONS, token=token) as notes,
        open_sse(relay.base_url, path(ids("pending")), token=token) as pending,
    ):
        await live.next_event()
        await notes.next_frame()
        await pending.next_frame()
        # and a client that stopped reading with megabytes queued: it must not hold shutdown up
        stuck = await RawStream.open(
            "127.0.0.1",
            relay.port,
            NOTIFICATIONS,
            {"Authorization": f"Bearer {token}"},
            rcvbuf=4096,
        )
        assert await stuck.read_head() == 200
        for n in range(60):
            await seed.publish_raw(
                keys.notification_channel(user),
                json.dumps({"type": "notification", "n": n, "pad": "x" * 60_000}),
            )
        started = time.monotonic()
        relay.proc.signal(signal.SIGTERM)
        endings = await asyncio.gather(
            live.wait_ended(6), notes.wait_ended(6), pending.wait_ended(6)
        )
        for frames in endings:
            last = [f for f in frames if f.is_event][-1]
            assert last.json() == {"type": "STREAM_CLOSED", "reason": "shutdown"}
        await eventually(lambda: not relay.proc.running(), 6, what="relay exit")
        assert time.monotonic() - started < 5
        stuck.close()
    log = relay.proc.log()
    assert '"reason": "shutdown"' in log


async def _collect(stream: SSEStream, count: int, within: float) -> list[SSEFrame]:
    return await stream.take(count, within)


async def test_redis_restart_with_its_data_loses_and_repeats_nothing(
    own_redis: RedisServer, relay_factory: RelayFactory, ids: Ids
) -> None:
    relay = relay_factory(redis_url=own_redis.url, SSE_HEARTBEAT_SECONDS="1")
    session = ids("s")
    async with seeder(own_redis.url) as seed:
        await seed.start(session, "u1", 100)
        before = await seed.upload_many(session, 3, prefix="a")
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        assert (await stream.next_event()).id == before[-1]
        async with aioredis.Redis.from_url(own_redis.url) as admin:
            await admin.save()  # this Redis keeps its data across the restart
        own_redis.kill()
        # streams stay open on heartbeats; the relay says it is not ready
        frame = await stream.next_frame(3)
        assert frame.comments
        assert not frame.is_event
        await eventually(lambda: _ready(relay.base_url) == 503, 5, what="ready 503")
        own_redis.start()
        # publish right away: some of these land before the relay has resubscribed
        async with seeder(own_redis.url) as seed:
            during = await seed.upload_many(session, 5, prefix="b")
            await eventually(lambda: _ready(relay.base_url) == 200, 10, what="ready again")
            after = await seed.upload_many(session, 3, prefix="c")
            frames = await _collect(stream, 8, 10)
            log_ids = await seed.log_ids(session)
        assert [f.id for f in frames] == during + after
        assert log_ids[-8:] == during + after
        await stream.expect_silence(0.5)
    assert relay.metric("rapidphoto_relay_redis_reconnects_total") >= 1


async def test_redis_restart_without_its_data_closes_lost_sessions_and_keeps_the_rest(
    own_redis: RedisServer, relay_factory: RelayFactory, ids: Ids
) -> None:
    relay = relay_factory(redis_url=own_redis.url, SSE_HEARTBEAT_SECONDS="1")
    session, user = ids("s"), ids("u")
    async with seeder(own_redis.url) as seed:
        await seed.start(session, user, 2)
    token = relay.token(user)
    async with (
        open_sse(relay.base_url, path(session), token=token) as lost,
        open_sse(relay.base_url, NOTIFICATIONS, token=token) as notes,
    ):
        await lost.next_event()
        await notes.next_frame()
        own_redis.kill()
        assert (await notes.next_frame(3)).comments  # heartbeats meanwhile
        own_redis.start()  # empty: no persistence
        frames = await lost.wait_ended(15)
        assert [f.json() for f in frames if f.is_event] == [
            {"type": "STREAM_CLOSED", "reason": "session-not-found"}
        ]
        await eventually(lambda: _ready(relay.base_url) == 200, 10, what="ready again")
        async with seeder(own_redis.url) as seed:
            fresh = ids("s")
            await seed.start(fresh, user, 1)
            done = await seed.upload(fresh, "p0")
        note = await notes.next_event(5)
        assert (note.event, note.id) == ("notification", done.notification_id)


async def test_dropped_subscription_connection_is_resumed_from_the_log(
    own_redis: RedisServer, relay_factory: RelayFactory, ids: Ids
) -> None:
    """The relay's pub/sub link dies while Redis stays up and events keep coming."""
    relay = relay_factory(redis_url=own_redis.url)
    session = ids("s")
    async with seeder(own_redis.url) as seed, aioredis.Redis.from_url(own_redis.url) as admin:
        await seed.start(session, "u1", 200)
        async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
            await stream.next_event()
            sent: list[str] = []
            for round_ in range(3):
                sent += await seed.upload_many(session, 5, prefix=f"r{round_}a")
                killed = await admin.client_kill_filter(_type="pubsub")
                assert killed >= 1
                sent += await seed.upload_many(session, 5, prefix=f"r{round_}b")
                await eventually(lambda: _ready(relay.base_url) == 200, 10, what="resubscribed")
            frames = await stream.take(len(sent), 10)
            assert [f.id for f in frames] == sent
            await stream.expect_silence(0.5)


async def test_streams_open_while_redis_is_out_of_memory(
    own_redis: RedisServer, relay_factory: RelayFactory, ids: Ids
) -> None:
    """Bug found by the Redis fault matrix (issue 9): with Redis out of memory (``maxmemory``
    reached, ``noeviction``) every new session stream got 503. The relay read the session's state
    and newest log entry in a MULTI/EXEC, and Redis refuses every command queued in a MULTI while
    out of memory, reads included. Reads still work then, so streams must open and resume."""
    relay = relay_factory(redis_url=own_redis.url)
    session = ids("s")
    token = relay.token("u1")
    async with seeder(own_redis.url) as seed, aioredis.Redis.from_url(own_redis.url) as admin:
        await seed.start(session, "u1", 5)
        logged = await seed.log_ids(session) + await seed.upload_many(session, 2)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write is refused from now on
        try:
            async with open_sse(relay.base_url, path(session), token=token) as new:
                assert new.status_code == 200, new.body
                snapshot = await new.next_event()
            async with open_sse(
                relay.base_url, path(session), token=token, last_event_id=logged[0]
            ) as resumed:
                assert resumed.status_code == 200, resumed.body
                replayed = await resumed.take(2)
            async with open_sse(relay.base_url, NOTIFICATIONS, token=token) as notes:
                assert notes.status_code == 200, notes.body
        finally:
            await admin.config_set("maxmemory", 0)
    assert (snapshot.event, snapshot.id) == ("SESSION_SNAPSHOT", logged[-1])
    assert [f.id for f in replayed] == logged[1:]
