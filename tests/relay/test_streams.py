"""PROTOCOL §5 session streams over real HTTP: headers, retry frame, ids, ownership, pending sessions,
snapshots, heartbeats, token expiry and completion."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from tests.relay.conftest import Relay, RelayFactory
from tests.support.seed import Seeder
from tests.support.sse import SSEFrame, SSEStream, open_sse

Ids = Callable[[str], str]


def path(session_id: str) -> str:
    return f"/api/upload/sessions/{session_id}/stream"


async def _log(seed: Seeder, session_id: str) -> list[tuple[str, dict[str, Any]]]:
    entries = await seed.entries(keys.session_log_key(session_id))
    return [(entry_id, json.loads(data)) for entry_id, data in entries]


async def test_stream_headers_and_retry_frame_first(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "u1", 3)
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        first = await stream.next_frame()
        assert first.raw == b"retry: 2000\n\n"  # alone in its frame, before anything else
        snapshot = await stream.next_event()
        assert snapshot.event == "SESSION_SNAPSHOT"


@pytest.mark.parametrize(
    "bad_id", ["a:b", "a*b", "a{b}", "a b", "caf\u00e9", "x" * 129, "a.b", "a%25b"]
)
async def test_session_id_that_is_not_an_id_is_400(relay: Relay, bad_id: str) -> None:
    async with open_sse(relay.base_url, path(bad_id), token=relay.token("u1")) as stream:
        assert stream.status_code == 400
        assert set(stream.error()) == {"error"}


async def test_session_of_another_owner_is_403(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "owner", 3)
    async with open_sse(relay.base_url, path(session), token=relay.token("other")) as stream:
        assert stream.status_code == 403
        assert set(stream.error()) == {"error"}
        assert stream.frames == []


async def test_snapshot_reflects_state_failures_and_newest_log_id(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 5)
    await seed.upload(session, "p0")
    await seed.fail(session, "p1", "corrupt file")
    await seed.fail(session, "p2", "too big")
    await seed.upload(session, "p2")  # a failed photo later uploaded leaves the failures
    newest = (await _log(seed, session))[-1][0]
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        snapshot = await stream.next_event()
        assert snapshot.event == "SESSION_SNAPSHOT"
        assert snapshot.id == newest
        assert snapshot.json() == {
            "type": "SESSION_SNAPSHOT",
            "eventId": newest,
            "sessionId": session,
            "totalPhotos": 5,
            "uploadedPhotos": 2,
            "failedPhotos": 1,
            "progressPercent": 60,
            "status": "IN_PROGRESS",
            "failures": [{"photoId": "p1", "reason": "corrupt file"}],
        }
        # then live events, framed with their log ids
        result = await seed.upload(session, "p3")
        live = await stream.next_event()
        assert (live.event, live.id) == ("PHOTO_UPLOADED", result.event_ids[0])
        log = await seed.entries(keys.session_log_key(session))
        assert live.data == log[-1][1]  # the exact published bytes


async def test_snapshot_lists_the_100_most_recent_failures(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 150)
    for n in range(120):
        await seed.fail(session, f"p{n}", f"reason {n}")
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        snapshot = (await stream.next_event()).json()
    assert snapshot["failedPhotos"] == 120
    assert [f["photoId"] for f in snapshot["failures"]] == [f"p{n}" for n in range(20, 120)]


async def test_snapshot_of_an_empty_log_has_no_id(
    relay: Relay, seed: Seeder, rclient: aioredis.Redis, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    await rclient.delete(keys.session_log_key(session))
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        snapshot = await stream.next_event()
    assert snapshot.event == "SESSION_SNAPSHOT"
    assert snapshot.id is None
    assert b"id:" not in snapshot.raw
    assert "eventId" not in snapshot.json()


async def test_pending_session_that_appears_owned_gets_a_snapshot(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        assert stream.status_code == 200
        assert (await stream.next_frame()).retry == 2000
        await stream.expect_silence(0.7)  # no events while it does not exist (heartbeats ok)
        started = await seed.start(session, "u1", 2)
        snapshot = await stream.next_event(3)
        assert snapshot.event == "SESSION_SNAPSHOT"
        assert snapshot.id == started.event_ids[0]
        assert snapshot.json()["totalPhotos"] == 2
        uploaded = await seed.upload(session, "p0")
        live = await stream.next_event()
        assert (live.event, live.id) == ("PHOTO_UPLOADED", uploaded.event_ids[0])


async def test_pending_session_that_appears_with_another_owner_is_closed_forbidden(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        assert stream.status_code == 200
        await stream.next_frame()
        await seed.start(session, "someone-else", 2)
        frames = await stream.wait_ended(3)
    events = [f for f in frames if f.is_event]
    assert [(e.event, e.json()) for e in events] == [
        ("STREAM_CLOSED", {"type": "STREAM_CLOSED", "reason": "forbidden"})
    ]


async def test_pending_session_that_never_appears_is_closed_after_10s(
    relay: Relay, ids: Ids
) -> None:
    async with open_sse(relay.base_url, path(ids("s")), token=relay.token("u1")) as stream:
        opened = time.monotonic()
        frames = await stream.wait_ended(15)
        waited = time.monotonic() - opened
    events = [f for f in frames if f.is_event]
    assert [e.json() for e in events] == [{"type": "STREAM_CLOSED", "reason": "session-not-found"}]
    assert 9.5 <= waited <= 12
    assert any(f.comments for f in frames)  # heartbeats kept it alive meanwhile


async def test_idle_stream_gets_heartbeat_comments(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        await stream.next_event()
        beats = 0
        deadline = time.monotonic() + 3.5
        while beats < 2:
            frame = await stream.next_frame(deadline - time.monotonic())
            assert not frame.is_event
            beats += len(frame.comments)
        assert beats >= 2  # SSE_HEARTBEAT_SECONDS=1 on the shared relay


async def test_stream_is_closed_when_the_token_expires(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    token = relay.token("u1", ttl=2)
    exp = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[1] + "==").decode())[
        "exp"
    ]
    async with open_sse(relay.base_url, path(session), token=token) as stream:
        await stream.next_event()
        frames = await stream.wait_ended(6)
        closed_at = time.time()
    assert [f.json() for f in frames if f.is_event] == [
        {"type": "STREAM_CLOSED", "reason": "token-expired"}
    ]
    assert exp - 0.1 <= closed_at <= exp + 2.5


async def test_token_expiry_close_honours_the_leeway(
    relay_factory: RelayFactory, seed: Seeder, ids: Ids
) -> None:
    relay = relay_factory(JWT_LEEWAY_SECONDS="2")
    session = ids("s")
    await seed.start(session, "u1", 2)
    now = time.time()
    token = relay.token("u1", ttl=1)
    exp = int(now + 1)
    async with open_sse(relay.base_url, path(session), token=token) as stream:
        await stream.next_event()
        frames = await stream.wait_ended(8)
        closed_at = time.time()
    assert [f.json()["reason"] for f in frames if f.is_event] == ["token-expired"]
    assert exp + 2 - 0.1 <= closed_at <= exp + 2 + 2.5


async def _complete(seed: Seeder, session: str, stream: SSEStream) -> list[SSEFrame]:
    await seed.upload(session, "p0")
    await seed.fail(session, "p1", "broken")
    return await stream.wait_ended(5)


async def test_completed_session_closes_the_stream_after_session_completed(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        await stream.next_event()
        frames = await _complete(seed, session, stream)
    events = [f for f in frames if f.is_event]
    assert [e.event for e in events] == [
        "PHOTO_UPLOADED",
        "PHOTO_FAILED",
        "SESSION_COMPLETED",
        "STREAM_CLOSED",
    ]
    assert events[-1].json() == {"type": "STREAM_CLOSED", "reason": "completed"}
    assert events[-1].id is None
    log = await _log(seed, session)
    assert [e.id for e in events[:3]] == [entry_id for entry_id, _ in log[1:]]


async def test_reconnecting_at_the_end_of_a_completed_session_is_204(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 1)
    done = await seed.upload(session, "p0")
    last = done.event_ids[-1]
    for kwargs in ({"last_event_id": last}, {"params": {"lastEventId": last}}):
        async with open_sse(relay.base_url, path(session), token=relay.token("u1"), **kwargs) as s:
            assert s.status_code == 204
            assert s.body == b""


async def test_fresh_connection_to_a_completed_session_gets_snapshot_then_closed(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 1)
    await seed.upload(session, "p0")
    async with open_sse(relay.base_url, path(session), token=relay.token("u1")) as stream:
        frames = await stream.wait_ended(5)
    events = [f for f in frames if f.is_event]
    assert [e.event for e in events] == ["SESSION_SNAPSHOT", "STREAM_CLOSED"]
    assert events[0].json()["status"] == "COMPLETED"
    assert events[1].json()["reason"] == "completed"


async def test_resuming_before_completion_replays_the_rest_then_closes(
    relay: Relay, seed: Seeder, ids: Ids
) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    first = await seed.upload(session, "p0")
    rest = await seed.upload(session, "p1")
    async with open_sse(
        relay.base_url, path(session), token=relay.token("u1"), last_event_id=first.event_ids[0]
    ) as stream:
        frames = await stream.wait_ended(5)
    events = [f for f in frames if f.is_event]
    assert [(e.event, e.id) for e in events] == [
        ("PHOTO_UPLOADED", rest.event_ids[0]),
        ("SESSION_COMPLETED", rest.event_ids[1]),
        ("STREAM_CLOSED", None),
    ]


async def test_curl_smoke(relay: Relay, seed: Seeder, ids: Ids) -> None:
    """The stream works with a plain `curl -N` (no SSE library at all)."""
    session = ids("s")
    await seed.start(session, "u1", 1)
    await seed.upload(session, "p0")
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sN",
        "--max-time",
        "10",
        "-H",
        f"Authorization: Bearer {relay.token('u1')}",
        relay.base_url + path(session),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    text = out.decode()
    assert proc.returncode == 0
    assert text.startswith("retry: 2000\n\n")
    assert "event: SESSION_SNAPSHOT\n" in text
    assert text.endswith(
        'event: STREAM_CLOSED\ndata: {"type":"STREAM_CLOSED","reason":"completed"}\n\n'
    )
