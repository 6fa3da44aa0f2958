"""The multi-session stream (PROTOCOL §5.1) through real processes: a worker applying jobs, two
relays, and the product's Python client holding one stream for eight sessions and the
notifications while a relay is SIGKILLed under it; and a reconnection to the other relay with the
cursor and one more session, while jobs run.

Every client is held to the logs the worker wrote: each session's events exactly once, in log
order, after its snapshot; every notification once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from urllib.parse import urlencode

import pytest

from rapidphoto_contract.events import Notification, SessionCompleted, SessionSnapshot
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.realtime import StateChange, StreamEvent, stream
from tests.e2e.conftest import Cluster, Truth, drive, fresh, opened, running
from tests.support.sse import SSEFrame, open_sse

pytestmark = pytest.mark.e2e

ClusterFactory = Callable[[str], Cluster]
MULTI = "/api/upload/sessions/stream"


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def _assert_each_session_exact(
    events: list[StreamEvent], sessions: list[str], truth: Truth
) -> None:
    """Per session: a snapshot first, then exactly the log entries after the id it reflects."""
    by_session: dict[str, list[StreamEvent]] = defaultdict(list)
    for event in events:
        if not isinstance(event, Notification):
            by_session[getattr(event, "session_id", "?")].append(event)
    assert set(by_session) == set(sessions)
    for session in sessions:
        got = by_session[session]
        first = got[0]
        assert isinstance(first, SessionSnapshot), f"{session}: starts with {first}"
        after = first.event_id
        rest = [getattr(e, "event_id", None) for e in got[1:]]
        assert not any(isinstance(e, SessionSnapshot) for e in got[1:]), (
            f"{session}: a second snapshot (the resume was not exact)"
        )
        log = [e.id for e in await truth.log(session)]
        want = [i for i in log if after is None or _key(i) > _key(after)]
        assert rest == want, f"{session}: {len(rest)} events, the log has {len(want)} after {after}"


async def test_one_stream_for_eight_sessions_survives_a_relay_sigkill(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    user = fresh("u")
    sessions = [fresh(f"s{i}") for i in range(8)]
    photos = 24
    for session in sessions:
        await jobs.start_upload_session(session, user, total_photos=photos)
    for session in sessions:
        await truth.wait_status(session, "IN_PROGRESS")
    opens: list[str] = []

    def on_state(change: StateChange) -> None:
        if change.state == "open":
            opens.append(change.url)

    events: list[StreamEvent] = []
    async with stream(
        [a.base_url, b.base_url],
        token=cluster.token(user),
        sessions=sessions,
        notifications=True,
        on_state=on_state,
    ) as multi:
        await opened(multi)
        assert a.open_streams() == 1  # one connection for eight sessions and the notifications

        async def drive_all() -> None:
            await asyncio.gather(*(drive(jobs, s, photos, every=0.02) for s in sessions))

        async with running(drive_all()) as driver:
            async with asyncio.timeout(20):
                while len(events) < 8 + 40:  # the snapshots and some live events
                    events.append(await anext(multi))
            a.proc.kill()
            await asyncio.wait_for(driver, 60)
            completed: set[str] = set()
            notified: set[str] = set()
            async with asyncio.timeout(30):
                while completed != set(sessions) or notified != set(sessions):
                    event = await anext(multi)
                    events.append(event)
                    if isinstance(event, SessionCompleted):
                        completed.add(event.session_id)
                    elif isinstance(event, Notification):
                        assert event.session_id not in notified, "a notification twice"
                        notified.add(event.session_id)
    assert opens == [a.base_url, b.base_url]
    await _assert_each_session_exact(events, sessions, truth)
    got_notes = [e.event_id for e in events if isinstance(e, Notification)]
    assert sorted(got_notes, key=lambda i: _key(i or "0-0")) == [
        n.id for n in await truth.notifications(user)
    ]


async def test_resume_on_the_other_relay_with_an_added_session_while_jobs_run(
    cluster_factory: ClusterFactory, redis_url: str, jobs: UploadJobsClient, truth: Truth
) -> None:
    """The raw wire: the cursor taken on relay a, sent to relay b with one more session asked for,
    while the worker keeps writing; b resumes the two known sessions exactly and starts the new one
    with its snapshot."""
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    user = fresh("u")
    one, two, added = fresh("one"), fresh("two"), fresh("added")
    photos = 30
    for session in (one, two, added):
        await jobs.start_upload_session(session, user, total_photos=photos)
        await truth.wait_status(session, "IN_PROGRESS")
    token = cluster.token(user)
    path = f"{MULTI}?{urlencode([('session', one), ('session', two)])}"
    async with running(
        asyncio.gather(*(drive(jobs, s, photos, every=0.02) for s in (one, two, added)))
    ) as driver:
        async with open_sse(a.base_url, path, token=token) as first:
            seen = await first.take(2 + 10, timeout=15)
        cursor = [f.id for f in seen if f.id is not None][-1]
        await asyncio.sleep(0.2)  # the worker goes on while no client is connected
        again = f"{path}&{urlencode([('session', added)])}"
        async with open_sse(b.base_url, again, token=token, last_event_id=cursor) as second:
            await asyncio.wait_for(driver, 60)
            await truth.wait_status(one, "COMPLETED")
            await truth.wait_status(two, "COMPLETED")
            await truth.wait_status(added, "COMPLETED")
            rest: list[SSEFrame] = []
            async with asyncio.timeout(20):
                while sum(f.event == "SESSION_COMPLETED" for f in rest) < 3:
                    rest.append(await second.next_event(timeout=20))
            end = await second.wait_ended(timeout=5)
    assert [f.json() for f in end if f.is_event] == [
        {"type": "STREAM_CLOSED", "reason": "completed"}
    ]
    frames = seen + rest
    for session in (one, two):
        ids = [f.json().get("eventId") for f in frames if f.json().get("sessionId") == session]
        snapshot_id = ids[0]
        log = [e.id for e in await truth.log(session)]
        assert ids[1:] == [i for i in log if snapshot_id is None or _key(i) > _key(snapshot_id)]
    added_frames = [f for f in rest if f.json().get("sessionId") == added]
    assert added_frames[0].event == "SESSION_SNAPSHOT"
    after = added_frames[0].json()["eventId"]
    log = [e.id for e in await truth.log(added)]
    assert [f.json()["eventId"] for f in added_frames[1:]] == [
        i for i in log if after is None or _key(i) > _key(after)
    ]
