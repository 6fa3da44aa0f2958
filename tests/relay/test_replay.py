"""PROTOCOL §5 Last-Event-ID rules over real HTTP, session and notification streams.

Every id and payload is checked against the worker's own log, so "exactly the events after it, in
order, with no gap and no duplicate" is checked literally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from rapidphoto_contract import keys
from tests.relay.conftest import Relay
from tests.support.seed import Seeder, seeder
from tests.support.sse import SSEFrame, open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


def path(session_id: str) -> str:
    return f"/api/upload/sessions/{session_id}/stream"


async def _log(seed: Seeder, key: str) -> list[tuple[str, str]]:
    return await seed.entries(key)


def _pairs(frames: list[SSEFrame]) -> list[tuple[str | None, str | None]]:
    return [(f.id, f.data) for f in frames]


async def _session_with_events(
    seed: Seeder, session: str, uploads: int, total: int = 50
) -> list[str]:
    ids = list((await seed.start(session, "u1", total)).event_ids)
    ids += await seed.upload_many(session, uploads)
    return ids


@pytest.mark.parametrize("via", ["header", "query"])
async def test_covered_id_replays_exactly_what_follows_then_live(
    relay: Relay, seed: Seeder, ids: Ids, via: str
) -> None:
    session = ids("s")
    event_ids = await _session_with_events(seed, session, 4)
    resume = event_ids[1]
    kwargs: dict[str, Any] = (
        {"last_event_id": resume} if via == "header" else {"params": {"lastEventId": resume}}
    )
    async with open_sse(relay.base_url, path(session), token=relay.token("u1"), **kwargs) as stream:
        replayed = await stream.take(3)
        log = await _log(seed, keys.session_log_key(session))
        assert _pairs(replayed) == log[2:]
        live = await seed.upload(session, "live")
        frame = await stream.next_event()
        assert frame.id == live.event_ids[0]
        await stream.expect_silence(0.3)


async def test_header_wins_over_query(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    event_ids = await _session_with_events(seed, session, 3)
    async with open_sse(
        relay.base_url,
        path(session),
        token=relay.token("u1"),
        last_event_id=event_ids[2],
        params={"lastEventId": event_ids[0]},
    ) as stream:
        assert (await stream.next_event()).id == event_ids[3]


async def test_resuming_at_the_newest_entry_replays_nothing(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    event_ids = await _session_with_events(seed, session, 2)
    async with open_sse(
        relay.base_url, path(session), token=relay.token("u1"), last_event_id=event_ids[-1]
    ) as stream:
        await stream.expect_silence(0.5)
        live = await seed.upload(session, "next")
        assert (await stream.next_event()).id == live.event_ids[0]


async def test_resuming_from_a_snapshot_id_continues_exactly_after_it(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await _session_with_events(seed, session, 2)
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        snapshot = await stream.next_event()
    more = await seed.upload(session, "after-snapshot")
    async with open_sse(
        relay.base_url, path(session), token=relay.token("u1"), last_event_id=snapshot.id
    ) as stream:
        frame = await stream.next_event()
        assert (frame.event, frame.id) == ("PHOTO_UPLOADED", more.event_ids[0])


@pytest.mark.parametrize(
    "last_event_id",
    [
        "abc",
        "12",
        "1-",
        "-1",
        "1-2-3",
        "1 - 2",
        "18446744073709551616-0",
        "0x10-0",
        "99999999999999-0",
    ],
)
@pytest.mark.parametrize("via", ["header", "query"])
async def test_malformed_or_future_id_gets_a_snapshot(
    relay: Relay, seed: Seeder, ids: Ids, last_event_id: str, via: str
) -> None:
    session = ids("s")
    event_ids = await _session_with_events(seed, session, 2)
    kwargs: dict[str, Any] = (
        {"last_event_id": last_event_id}
        if via == "header"
        else {"params": {"lastEventId": last_event_id}}
    )
    async with open_sse(relay.base_url, path(session), token=relay.token("u1"), **kwargs) as stream:
        frame = await stream.next_event()
        assert (frame.event, frame.id) == ("SESSION_SNAPSHOT", event_ids[-1])
        await stream.expect_silence(0.2)


async def test_trimmed_past_id_gets_a_snapshot_and_a_covered_one_still_replays(
    relay: Relay, ids: Ids
) -> None:
    session = ids("s")
    async with seeder(relay.redis_url, session_log_maxlen=10) as seed:
        event_ids = await _session_with_events(seed, session, 250, total=1000)
        log = await _log(seed, keys.session_log_key(session))
    remaining = [entry_id for entry_id, _ in log]
    assert 10 <= len(remaining) < len(event_ids)  # approximate trimming kept more than 10
    assert remaining == event_ids[-len(remaining) :]
    token = relay.token("u1")
    # trimmed past: the entries after it are partly gone, so a snapshot
    async with open_sse(
        relay.base_url, path(session), token=token, last_event_id=event_ids[0]
    ) as s:
        frame = await s.next_event()
        assert (frame.event, frame.id) == ("SESSION_SNAPSHOT", event_ids[-1])
        assert frame.json()["uploadedPhotos"] == 250
    # the first remaining entry is still covered: exactly what follows it
    async with open_sse(
        relay.base_url, path(session), token=token, last_event_id=remaining[0]
    ) as s:
        frames = await s.take(len(remaining) - 1)
        assert _pairs(frames) == log[1:]


async def test_no_gap_and_no_duplicate_while_events_race_the_connection(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    """Events published while the stream subscribes and reads the log arrive exactly once."""
    session = ids("s")
    event_ids = await _session_with_events(seed, session, 3, total=200)
    stop = asyncio.Event()

    async def publish() -> None:
        n = 0
        while not stop.is_set() and n < 190:
            await seed.upload(session, f"race{n}")
            n += 1
            await asyncio.sleep(0.002)

    publisher = asyncio.create_task(publish())
    try:
        for attempt in range(5):  # several connections, each landing at a different moment
            async with open_sse(
                relay.base_url, path(session), token=relay.token("u1"), last_event_id=event_ids[1]
            ) as stream:
                await asyncio.sleep(0.02 * attempt)
                got: list[SSEFrame] = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        got.append(await stream.next_event(0.3))
            log = await _log(seed, keys.session_log_key(session))
            start = [i for i, _ in log].index(event_ids[1]) + 1
            assert _pairs(got) == log[start : start + len(got)]
            assert len(got) >= 2
    finally:
        stop.set()
        await publisher


# --- notification streams ----------------------------------------------------------------------


async def _complete_sessions(seed: Seeder, user: str, ids: Ids, count: int) -> list[str]:
    """Complete ``count`` one-photo sessions of ``user``: one notification each."""
    out = []
    for _ in range(count):
        session = ids("s")
        await seed.start(session, user, 1)
        result = await seed.upload(session, "p")
        assert result.notification_id is not None
        out.append(result.notification_id)
    return out


async def test_notifications_without_id_start_live(relay: Relay, seed: Seeder, ids: Ids) -> None:
    user = ids("u")
    await _complete_sessions(seed, user, ids, 2)
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(user)) as stream:
        await stream.next_frame()  # retry
        await stream.expect_silence(0.3)
        [new] = await _complete_sessions(seed, user, ids, 1)
        frame = await stream.next_event()
        assert (frame.event, frame.id) == ("notification", new)
        body = frame.json()
        assert body["kind"] == "UPLOAD_SESSION_COMPLETED"
        assert body["userId"] == user


async def test_notifications_with_covered_id_replay_what_follows(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    user = ids("u")
    sent = await _complete_sessions(seed, user, ids, 3)
    async with open_sse(
        relay.base_url, NOTIFICATIONS, token=relay.token(user), last_event_id=sent[0]
    ) as stream:
        assert [f.id for f in await stream.take(2)] == sent[1:]
        await stream.expect_silence(0.3)


async def test_notifications_with_id_older_than_the_log_replay_all_of_it(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    user = ids("u")
    sent = await _complete_sessions(seed, user, ids, 3)
    async with open_sse(
        relay.base_url, NOTIFICATIONS, token=relay.token(user), params={"lastEventId": "1-0"}
    ) as stream:
        frames = await stream.take(3)
        assert [f.id for f in frames] == sent
        log = await _log(seed, keys.user_notifications_log_key(user))
        assert _pairs(frames) == log


@pytest.mark.parametrize("last_event_id", ["garbage", "1-x", "99999999999999-0"])
async def test_notifications_with_malformed_or_future_id_start_live(
    relay: Relay, seed: Seeder, ids: Ids, last_event_id: str
) -> None:
    user = ids("u")
    await _complete_sessions(seed, user, ids, 2)
    async with open_sse(
        relay.base_url, NOTIFICATIONS, token=relay.token(user), last_event_id=last_event_id
    ) as stream:
        await stream.next_frame()
        await stream.expect_silence(0.3)
        [new] = await _complete_sessions(seed, user, ids, 1)
        assert (await stream.next_event()).id == new


async def test_notification_stream_only_carries_the_callers_channel(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    me, other = ids("u"), ids("u")
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(me)) as stream:
        await stream.next_frame()
        await _complete_sessions(seed, other, ids, 1)
        await seed.publish_raw(
            keys.notification_channel(me), json.dumps({"type": "notification", "x": 1})
        )
        frame = await stream.next_event()
        assert frame.json() == {"type": "notification", "x": 1}
