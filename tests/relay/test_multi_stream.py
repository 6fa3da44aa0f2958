"""PROTOCOL §5.1, the multi-session stream, over real HTTP against a real relay and Redis: checks
and refusals, order of the first frames, the cursor (resume, added sessions, malformed, size),
pending sessions, SESSION_CLOSED, completion and 204, and limits counted once.

These read the wire (``tests.support.sse``): the ids of frames are what is under test."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from tests.relay.conftest import Relay, RelayFactory, eventually
from tests.support.redis_server import RedisServer
from tests.support.seed import Seeder, seeder
from tests.support.sse import RawStream, SSEFrame, SSEStream, open_sse

Ids = Callable[[str], str]
MULTI = "/api/upload/sessions/stream"


def multi(*sessions: str, notifications: str | None = None) -> str:
    query: list[tuple[str, str]] = [("session", s) for s in sessions]
    if notifications is not None:
        query.append(("notifications", notifications))
    return f"{MULTI}?{urlencode(query)}"


async def log_ids(seed: Seeder, session_id: str) -> list[str]:
    return await seed.log_ids(session_id)


def payloads(frames: list[SSEFrame]) -> list[dict[str, Any]]:
    return [f.json() for f in frames]


def cursor_of(frames: list[SSEFrame]) -> str:
    """The last ``id:`` of ``frames``: what EventSource would send back."""
    ids = [f.id for f in frames if f.id is not None]
    assert ids, "no frame carried an id"
    return ids[-1]


async def events_until(stream: SSEStream, count: int, timeout: float = 10.0) -> list[SSEFrame]:  # noqa: ASYNC109
    return await stream.take(count, timeout=timeout)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "",  # nothing asked for
        "?notifications=0",
        "?notifications=2",
        "?notifications=yes&session=s1",
        "?session=a:b",
        "?session=notifications",
        "?session=" + "x" * 129,
        "?session=caf%C3%A9",
        "?" + "&".join(f"session=s{i}" for i in range(33)),
    ],
)
async def test_bad_requests_are_400_before_anything_streams(relay: Relay, query: str) -> None:
    async with open_sse(relay.base_url, MULTI + query, token=relay.token("u1")) as stream:
        assert stream.status_code == 400
        assert set(stream.error()) == {"error"}
        assert stream.frames == []


async def test_authentication_comes_first(relay: Relay) -> None:
    async with open_sse(relay.base_url, MULTI + "?session=a:b") as stream:
        assert stream.status_code == 401
        assert stream.headers["www-authenticate"] == "Bearer"


async def test_32_sessions_with_repeats_are_fine_and_a_foreign_one_is_403(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    mine = [ids("s") for _ in range(32)]
    foreign = ids("f")
    await seed.start(foreign, "owner", 1)
    for session in mine[:2]:
        await seed.start(session, "u1", 1)
    token = relay.token("u1")
    async with open_sse(relay.base_url, multi(*mine, mine[0], foreign), token=token) as stream:
        assert stream.status_code == 400  # 33 distinct
    async with open_sse(relay.base_url, multi(*mine[:31], mine[0], foreign), token=token) as stream:
        assert stream.status_code == 403  # 32 distinct, one of them foreign
        assert stream.frames == []
    async with open_sse(relay.base_url, multi(*mine, mine[1]), token=token) as stream:
        assert stream.status_code == 200  # 32 distinct: a repeat counts once


# --- the first frames, live, resume ----------------------------------------------------------------


async def test_snapshots_in_order_then_notification_replay_then_live(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    a, b = ids("a"), ids("b")
    await seed.start(a, "u1", 2)
    await seed.start(b, "u1", 3)
    await seed.upload(b, "p0")
    async with open_sse(
        relay.base_url, multi(b, a, notifications="1"), token=relay.token("u1")
    ) as stream:
        assert stream.status_code == 200
        assert (await stream.next_frame()).raw == b"retry: 2000\n\n"
        first = await events_until(stream, 2)
        assert [(f.event, f.json()["sessionId"]) for f in first] == [
            ("SESSION_SNAPSHOT", b),
            ("SESSION_SNAPSHOT", a),
        ]
        assert first[0].json()["uploadedPhotos"] == 1
        assert first[0].json()["eventId"] == (await log_ids(seed, b))[-1]
        assert all(f.id is not None and f.id.startswith("m1.") for f in first)
        await seed.upload(a, "p0")
        await seed.upload(a, "p1")  # completes a: SESSION_COMPLETED and a notification
        live = await events_until(stream, 4)
        assert [f.event for f in live] == [
            "PHOTO_UPLOADED",
            "PHOTO_UPLOADED",
            "SESSION_COMPLETED",
            "notification",
        ]
        assert [f.json()["eventId"] for f in live[:3]] == (await log_ids(seed, a))[1:]
        assert live[3].json()["sessionId"] == a
        # every frame that delivers a log entry carries a fresh cursor, never the payload's id
        assert len({f.id for f in first + live}) == 6
        await stream.expect_silence(0.3)  # a completed, b not: the stream goes on
        assert stream.ended is False


async def test_resume_with_the_cursor_no_gap_no_duplicate_and_added_session(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    a, b, c = ids("a"), ids("b"), ids("c")
    for session in (a, b, c):
        await seed.start(session, "u1", 10)
    token = relay.token("u1")
    async with open_sse(relay.base_url, multi(a, b, notifications="1"), token=token) as stream:
        seen = await events_until(stream, 2)
        await seed.upload(a, "p0")
        await seed.upload(b, "p0")
        seen += await events_until(stream, 2)
    last = cursor_of(seen)
    # while disconnected: more events on a and b, and a notification for the user
    await seed.upload(a, "p1")
    await seed.fail(b, "p1", "corrupt")
    await seed.upload_many(c, 10)  # completes c: its notification is the only one
    async with open_sse(
        relay.base_url, multi(a, b, c, notifications="1"), token=token, last_event_id=last
    ) as stream:
        resumed = await events_until(stream, 4)
        # a and b resume exactly after what they had; c (new to the cursor) starts with its
        # snapshot; then the notifications' replay
        assert [(f.event, f.json()["sessionId"]) for f in resumed] == [
            ("PHOTO_UPLOADED", a),
            ("PHOTO_FAILED", b),
            ("SESSION_SNAPSHOT", c),
            ("notification", c),
        ]
        assert resumed[0].json()["eventId"] == (await log_ids(seed, a))[-1]
        assert resumed[1].json()["eventId"] == (await log_ids(seed, b))[-1]
        await stream.expect_silence(0.3)


async def test_lastEventId_query_parameter_and_a_malformed_cursor(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    a = ids("a")
    await seed.start(a, "u1", 5)
    token = relay.token("u1")
    async with open_sse(relay.base_url, multi(a), token=token) as stream:
        snapshot = (await events_until(stream, 1))[0]
    await seed.upload(a, "p0")
    resume = f"{multi(a)}&{urlencode({'lastEventId': snapshot.id})}"
    async with open_sse(relay.base_url, resume, token=token) as stream:
        assert [f.event for f in await events_until(stream, 1)] == ["PHOTO_UPLOADED"]
    for garbage in [
        "m1.zz",
        "m2.",
        "1764213600000-0",
        "m1." + "A" * 8 + "~1-x",
        "m1.n~x",
        "m1." + "A" * 9000,
    ]:
        async with open_sse(relay.base_url, multi(a), token=token, last_event_id=garbage) as s:
            assert [f.event for f in await events_until(s, 1)] == ["SESSION_SNAPSHOT"]


async def test_cursor_stays_small_at_32_long_sessions(relay: Relay, seed: Seeder, ids: Ids) -> None:
    sessions = [ids("s") + "x" * 110 for _ in range(32)]  # 123-character ids
    for session in sessions:
        await seed.start(session, "u1", 2)
        await seed.upload(session, "p0")
    async with open_sse(
        relay.base_url, multi(*sessions, notifications="1"), token=relay.token("u1")
    ) as stream:
        frames = await events_until(stream, 32)
    last = cursor_of(frames)
    assert len(last) <= 4096
    assert all(session not in last for session in sessions)
    assert all(32 < ord(c) < 127 for c in last)


async def test_a_forged_cursor_cannot_read_another_users_session(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    mine, theirs = ids("m"), ids("t")
    await seed.start(mine, "u1", 2)
    await seed.start(theirs, "u2", 2)
    await seed.upload(theirs, "p0")
    async with open_sse(relay.base_url, multi(theirs), token=relay.token("u2")) as stream:
        their_cursor = cursor_of(await events_until(stream, 1))
    async with open_sse(
        relay.base_url, multi(mine), token=relay.token("u1"), last_event_id=their_cursor
    ) as stream:
        frames = await events_until(stream, 1)
        assert [f.json()["sessionId"] for f in frames] == [mine]
        await stream.expect_silence(0.2)
    async with open_sse(
        relay.base_url, multi(theirs), token=relay.token("u1"), last_event_id=their_cursor
    ) as stream:
        assert stream.status_code == 403


# --- pending sessions, SESSION_CLOSED, completion ----------------------------------------------------


async def test_pending_sessions_do_not_hold_up_the_others(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    live, later, foreign = ids("live"), ids("later"), ids("foreign")
    await seed.start(live, "u1", 5)
    async with open_sse(
        relay.base_url, multi(later, live, foreign), token=relay.token("u1")
    ) as stream:
        assert [f.json()["sessionId"] for f in await events_until(stream, 1)] == [live]
        await seed.upload(live, "p0")
        assert [f.event for f in await events_until(stream, 1)] == ["PHOTO_UPLOADED"]
        await seed.start(later, "u1", 1)
        await seed.start(foreign, "u2", 1)
        frames = await events_until(stream, 2)
        by_session = {f.json()["sessionId"]: f for f in frames}
        assert by_session[later].event in ("SESSION_SNAPSHOT", "SESSION_STARTED")
        assert by_session[foreign].json() == {
            "type": "SESSION_CLOSED",
            "sessionId": foreign,
            "reason": "forbidden",
        }
        assert by_session[foreign].id is not None  # the cursor records it as closed
        if by_session[later].event == "SESSION_SNAPSHOT":
            assert by_session[later].json()["totalPhotos"] == 1
        await seed.upload(later, "p0")
        rest = await events_until(stream, 1)
        if rest[0].event == "SESSION_STARTED":  # the snapshot came first only if it raced
            rest = await events_until(stream, 1)
        assert [f.event for f in rest] == ["PHOTO_UPLOADED"]
        assert rest[0].json()["sessionId"] == later


async def test_a_session_that_never_appears_is_closed_and_stays_closed(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    ghost, done = ids("ghost"), ids("done")
    await seed.start(done, "u1", 1)
    await seed.upload(done, "p0")  # completed
    token = relay.token("u1")
    async with open_sse(relay.base_url, multi(ghost, done), token=token) as stream:
        frames = [f for f in await stream.wait_ended(timeout=15) if f.is_event]
        assert [f.json() for f in frames][1:] == [
            {"type": "SESSION_CLOSED", "sessionId": ghost, "reason": "session-not-found"},
            {"type": "STREAM_CLOSED", "reason": "completed"},
        ]
        assert frames[0].event == "SESSION_SNAPSHOT"
        assert frames[0].json()["status"] == "COMPLETED"
        last = cursor_of(frames)
    # at the end of every completed session, the others closed: 204, no second wait
    async with open_sse(relay.base_url, multi(ghost, done), token=token, last_event_id=last) as s:
        assert s.status_code == 204
    # with notifications asked for, the stream stays open (and the ghost stays closed)
    async with open_sse(
        relay.base_url, multi(ghost, done, notifications="1"), token=token, last_event_id=last
    ) as stream:
        assert stream.status_code == 200
        await stream.expect_silence(0.5)
        assert stream.events == []


async def test_stream_closes_completed_when_every_session_completes(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    a, b = ids("a"), ids("b")
    await seed.start(a, "u1", 1)
    await seed.start(b, "u1", 1)
    async with open_sse(relay.base_url, multi(a, b), token=relay.token("u1")) as stream:
        await events_until(stream, 2)
        await seed.upload(a, "p0")
        await seed.upload(b, "p0")
        frames = [f for f in await stream.wait_ended() if f.is_event]
        assert [f.event for f in frames][-1] == "STREAM_CLOSED"
        assert frames[-1].json() == {"type": "STREAM_CLOSED", "reason": "completed"}
        completed = [f.json()["sessionId"] for f in frames if f.event == "SESSION_COMPLETED"]
        assert completed == [a, b]


# --- limits --------------------------------------------------------------------------------------


async def test_limits_count_a_multi_session_stream_once(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    relay = relay_factory(RELAY_MAX_CONNECTIONS_PER_USER="1")
    sessions = [ids("s") for _ in range(8)]
    for session in sessions:
        await seed.start(session, "u1", 1)
    token = relay.token("u1")
    async with open_sse(relay.base_url, multi(*sessions), token=token) as stream:
        assert stream.status_code == 200
        await events_until(stream, 8)
        assert relay.metric("rapidphoto_relay_open_streams", 'kind="multi"') == 1
        async with open_sse(relay.base_url, multi(sessions[0]), token=token) as second:
            assert second.status_code == 429
            assert int(second.headers["retry-after"]) >= 1
    async with open_sse(relay.base_url, multi(sessions[0]), token=token) as again:
        assert again.status_code == 200  # released once, on close


async def test_info_lists_the_endpoint_and_session_closed(relay: Relay) -> None:
    info = relay.get("/api/realtime/info").json()
    assert info["multiSessionStreamEndpoint"] == MULTI
    assert "SESSION_CLOSED" in info["messageTypes"]


async def test_log_order_per_session_under_interleaving(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    a, b = ids("a"), ids("b")
    await seed.start(a, "u1", 40)
    await seed.start(b, "u1", 40)
    async with open_sse(relay.base_url, multi(a, b), token=relay.token("u1")) as stream:
        await events_until(stream, 2)
        for i in range(20):
            await seed.upload(a, f"p{i}")
            await seed.upload(b, f"p{i}")
        frames = await events_until(stream, 40)
    for session in (a, b):
        got = [f.json()["eventId"] for f in frames if f.json()["sessionId"] == session]
        assert got == (await log_ids(seed, session))[1:]
    assert frames[-1].json()["type"] == "PHOTO_UPLOADED"
    assert keys.session_channel(a) != keys.session_channel(b)


# --- faults and closes: as on any stream -----------------------------------------------------------


async def test_dropped_subscription_resumes_every_session_from_the_log(
    own_redis: RedisServer, relay_factory: RelayFactory, ids: Ids
) -> None:
    """The relay's pub/sub link dies while events keep coming: each lane is read again from its
    own position (the resync race of a single stream, once per lane), nothing lost or doubled."""
    relay = relay_factory(redis_url=own_redis.url)
    user = ids("u")
    sessions = [ids("s") for _ in range(3)]
    async with seeder(own_redis.url) as seed, aioredis.Redis.from_url(own_redis.url) as admin:
        for session in sessions:
            await seed.start(session, user, 200)
        async with open_sse(relay.base_url, multi(*sessions), token=relay.token(user)) as stream:
            snapshots = await events_until(stream, 3)
            sent: dict[str, list[str]] = {s: [] for s in sessions}
            for round_ in range(2):
                for session in sessions:
                    sent[session] += await seed.upload_many(session, 3, prefix=f"r{round_}a")
                assert await admin.client_kill_filter(_type="pubsub") >= 1
                for session in sessions:
                    sent[session] += await seed.upload_many(session, 3, prefix=f"r{round_}b")
                await eventually(
                    lambda: relay.get("/health/ready").status_code == 200, 10, what="ready"
                )
            frames = await events_until(stream, sum(len(v) for v in sent.values()))
            await stream.expect_silence(0.5)
    assert [f.json()["sessionId"] for f in snapshots] == sessions
    for session in sessions:
        got = [f.json()["eventId"] for f in frames if f.json()["sessionId"] == session]
        assert got == sent[session]


async def test_token_expiry_closes_the_multi_stream(relay: Relay, seed: Seeder, ids: Ids) -> None:
    a = ids("a")
    await seed.start(a, "u1", 2)
    async with open_sse(
        relay.base_url, multi(a, notifications="1"), token=relay.token("u1", ttl=2)
    ) as stream:
        frames = [f for f in await stream.wait_ended(timeout=10) if f.is_event]
    assert [f.event for f in frames] == ["SESSION_SNAPSHOT", "STREAM_CLOSED"]
    assert frames[-1].json() == {"type": "STREAM_CLOSED", "reason": "token-expired"}


async def test_sigterm_closes_the_multi_stream_with_shutdown(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    relay = relay_factory()
    a, b = ids("a"), ids("b")
    await seed.start(a, "u1", 2)
    await seed.start(b, "u1", 2)
    async with open_sse(
        relay.base_url, multi(a, b, notifications="1"), token=relay.token("u1")
    ) as stream:
        await events_until(stream, 2)
        assert relay.proc.proc is not None
        relay.proc.proc.send_signal(signal.SIGTERM)
        frames = [f for f in await stream.wait_ended(timeout=5) if f.is_event]
    assert [f.json() for f in frames] == [{"type": "STREAM_CLOSED", "reason": "shutdown"}]


async def test_a_slow_multi_stream_is_closed_as_a_slow_consumer(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    relay = relay_factory(SSE_BUFFER_EVENTS="20")
    a, b = ids("a"), ids("b")
    await seed.start(a, "u1", 2)
    await seed.start(b, "u1", 2)
    token = relay.token("u1")
    slow = await RawStream.open(
        "127.0.0.1", relay.port, multi(a, b), {"Authorization": f"Bearer {token}"}, rcvbuf=4096
    )
    try:
        assert await slow.read_head() == 200
        pad = "x" * 60_000
        for n in range(150):  # ~9 MB on one session's channel: far more than the socket holds
            await seed.publish_raw(
                keys.session_channel(a), json.dumps({"type": "PROGRESS", "n": n, "pad": pad})
            )
        await eventually(
            lambda: relay.metric("rapidphoto_relay_slow_consumer_closes_total") == 1,
            10,
            what="closed as a slow consumer",
        )
        frames: list[SSEFrame] = []
        while not any(f.event == "STREAM_CLOSED" for f in frames):
            batch = await slow.read_frames(10)
            assert batch, "the stream ended without STREAM_CLOSED"
            frames.extend(batch)
    finally:
        slow.close()
    events = [f for f in frames if f.is_event]
    assert events[-1].json() == {"type": "STREAM_CLOSED", "reason": "slow-consumer"}
    numbers = [e.json()["n"] for e in events if e.event == "PROGRESS"]
    assert numbers == list(range(len(numbers)))  # a prefix, in order
    assert len(numbers) < 150
