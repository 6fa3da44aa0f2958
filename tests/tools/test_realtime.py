"""``rapidphoto_tools.realtime`` against real relay processes on a real Redis (state written by the
worker's own scripts, ``tests/support/seed.py``): typed events, resumption without loss or repeat
after a relay is killed, ``Retry-After``, the final reasons, 204, cancellation. The two relays
are the package's (``tests/tools/conftest.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from rapidphoto_contract import keys
from rapidphoto_contract.events import (
    Notification,
    PhotoFailed,
    PhotoUploaded,
    SessionClosed,
    SessionCompleted,
    SessionSnapshot,
    SessionStarted,
)
from rapidphoto_tools.realtime import (
    EventStream,
    OtherEvent,
    StateChange,
    StreamEvent,
    StreamRefused,
    stream,
    stream_path,
)
from tests.support.seed import Seeder
from tests.support.sse import open_sse
from tests.tools.conftest import Relays, fresh, token


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``check`` (state the client reports) without blocking the loop the client runs on."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s")


async def take(events: EventStream, count: int, within: float = 10.0) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    async with asyncio.timeout(within):
        while len(out) < count:
            out.append(await anext(events))
    return out


def opened_on(changes: list[StateChange], url: str) -> bool:
    return any(c.state == "open" and c.url == url for c in changes)


def event_ids(events: Sequence[StreamEvent]) -> list[str | None]:
    return [getattr(event, "event_id", None) for event in events]


async def rest(events: EventStream, within: float = 10.0) -> list[StreamEvent]:
    """Every event until the stream ends normally."""
    async with asyncio.timeout(within):
        return [event async for event in events]


def test_stream_path_chooses_the_endpoint() -> None:
    assert stream_path(["s1"], notifications=False) == "/api/upload/sessions/s1/stream"
    assert stream_path([], notifications=True) == "/api/upload/sessions/notifications/stream"
    assert stream_path(["a", "b", "a"], notifications=True) == (
        "/api/upload/sessions/stream?session=a&session=b&notifications=1"
    )
    assert stream_path(["a"], notifications=False, multi=True) == (
        "/api/upload/sessions/stream?session=a"
    )
    with pytest.raises(ValueError, match="sessions must match"):
        stream_path(["../x"], notifications=False)
    with pytest.raises(ValueError, match="nothing to stream"):
        stream_path([], notifications=False)


async def test_typed_events_then_completed_ends_the_iteration(relays: Relays, seed: Seeder) -> None:
    session, user = fresh("s"), fresh("u")
    await seed.start(session, user, 3)
    states: list[str] = []
    async with stream(
        relays.url(0),
        token=token(user),
        sessions=[session],
        on_state=lambda change: states.append(change.state),
    ) as events:
        snapshot = (await take(events, 1))[0]
        assert isinstance(snapshot, SessionSnapshot)
        assert (snapshot.uploaded_photos, snapshot.total_photos) == (0, 3)
        assert events.state == "open"
        assert events.retry_seconds == 0.1
        await seed.upload(session, "p1")
        await seed.fail(session, "p2", "corrupt")
        await seed.upload(session, "p3")
        got = await rest(events)
        assert events.close_reason == "completed"
        assert states[-1] == "closed"
    assert [type(e) for e in got] == [PhotoUploaded, PhotoFailed, PhotoUploaded, SessionCompleted]
    failed = got[1]
    assert isinstance(failed, PhotoFailed)
    assert (failed.photo_id, failed.reason, failed.failed_photos) == ("p2", "corrupt", 1)
    log = [entry_id for entry_id, _ in await seed.entries(keys.session_log_key(session))]
    assert events.last_event_id == log[-1]
    assert event_ids(got) == log[1:]
    assert states == ["connecting", "open", "closed"]


async def test_waits_retry_after_when_the_user_has_too_many_streams(
    relays: Relays, seed: Seeder
) -> None:
    session, user = fresh("s"), fresh("u")
    await seed.start(session, user, 1)
    changes: list[StateChange] = []
    path = stream_path([session], notifications=False)
    async with (
        open_sse(relays.url(0), path, token=token(user)) as held_1,
        open_sse(relays.url(0), path, token=token(user)) as held_2,
    ):
        assert (held_1.status_code, held_2.status_code) == (200, 200)
        events = stream(
            relays.url(0), token=token(user), sessions=[session], on_state=changes.append
        )
        async with events:
            await until(lambda: any(c.state == "reconnecting" for c in changes))
            await held_1.aclose()
            snapshot = (await take(events, 1))[0]
    assert isinstance(snapshot, SessionSnapshot)
    refused = [c for c in changes if c.state == "reconnecting"]
    # Retry-After is the relay's retry: in whole seconds, at least 1 (not the 100 ms retry:).
    assert [(c.reason, c.retry_in) for c in refused[:1]] == [("HTTP 429", 1.0)]
    assert changes[-1].state == "open"


async def test_refusals_are_typed(relays: Relays, seed: Seeder) -> None:
    session, owner, other = fresh("s"), fresh("u"), fresh("u")
    await seed.start(session, owner, 1)
    with pytest.raises(StreamRefused) as refused:
        await rest(stream(relays.url(0), token="not-a-jwt", sessions=[session]))
    assert (refused.value.reason, refused.value.status) == ("unauthorized", 401)
    assert "not-a-jwt" not in str(refused.value)

    events = stream(relays.url(0), token=token(other), sessions=[session])
    with pytest.raises(StreamRefused) as refused:
        await rest(events)
    assert (refused.value.reason, refused.value.status) == ("forbidden", 403)
    assert events.state == "error"

    # A pending session that appears with another owner: refused by STREAM_CLOSED, not HTTP.
    pending = fresh("s")
    events = stream(relays.url(1), token=token(other), sessions=[pending])
    async with events:
        await until(lambda: events.state == "open")
        await seed.start(pending, owner, 1)
        with pytest.raises(StreamRefused) as refused:
            await rest(events)
    assert (refused.value.reason, refused.value.status) == ("forbidden", None)


async def test_token_expiry_is_final_after_the_events_before_it(
    relays: Relays, seed: Seeder
) -> None:
    session, user = fresh("s"), fresh("u")
    await seed.start(session, user, 2)
    await seed.upload(session, "p1")
    events = stream(relays.url(0), token=token(user, ttl=1.5), sessions=[session])
    got = await take(events, 1)
    with pytest.raises(StreamRefused) as refused:
        await rest(events)
    assert (refused.value.reason, refused.value.status) == ("token-expired", None)
    assert [type(e) for e in got] == [SessionSnapshot]


async def test_204_for_a_completed_session_ends_normally(relays: Relays, seed: Seeder) -> None:
    session, user = fresh("s"), fresh("u")
    await seed.start(session, user, 1)
    await seed.upload(session, "p1")
    last = (await seed.entries(keys.session_log_key(session)))[-1][0]
    events = stream(relays.url(0), token=token(user), sessions=[session], last_event_id=last)
    assert await rest(events) == []
    assert events.close_reason == "completed"
    assert events.last_event_id == last


async def test_notifications_and_direct_publishes_of_unknown_types(
    relays: Relays, seed: Seeder
) -> None:
    session, user = fresh("s"), fresh("u")
    async with stream(relays.url(1), token=token(user), notifications=True) as events:
        await until(lambda: events.state == "open")
        # Cancelling a wait for the next event loses nothing: the stream goes on.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await anext(events)
        await seed.publish_raw(
            keys.notification_channel(user), '{"type":"quota.warning","usedBytes":7}'
        )
        direct = (await take(events, 1))[0]
        await seed.start(session, user, 1)
        await seed.upload(session, "p1")
        note = (await take(events, 1))[0]
    assert direct == OtherEvent(
        type="quota.warning", payload={"type": "quota.warning", "usedBytes": 7}
    )
    assert isinstance(note, Notification)
    assert (note.kind, note.session_id, note.uploaded_photos) == (
        "UPLOAD_SESSION_COMPLETED",
        session,
        1,
    )
    log = await seed.entries(keys.user_notifications_log_key(user))
    assert events.last_event_id == log[-1][0]
    assert not isinstance(note, SessionStarted)


async def test_a_silent_connection_is_resumed_from_the_position_it_resumed_from(
    relays: Relays, seed: Seeder
) -> None:
    """Regression: each response's SSE decoder starts with no id, so the ``retry:`` frame of a
    resumed stream cleared the resume position; dropped before its first event, the stream came
    back without ``Last-Event-ID`` and resynchronised (a snapshot) instead of resuming."""
    session, user = fresh("s"), fresh("u")
    await seed.start(session, user, 2)
    newest = (await seed.entries(keys.session_log_key(session)))[-1][0]
    changes: list[StateChange] = []
    # Shorter than the relay's 1 s heartbeat: every connection is given up as silent.
    events = stream(
        relays.url(1),
        token=token(user),
        sessions=[session],
        last_event_id=newest,
        idle_timeout=0.4,
        on_state=changes.append,
    )
    async with events:
        await until(lambda: sum(c.state == "reconnecting" for c in changes) >= 2)
        await seed.upload(session, "p1")
        (first,) = await take(events, 1)
    assert isinstance(first, PhotoUploaded)  # resumed after `newest`: no snapshot
    lost = [c for c in changes if c.state == "reconnecting"]
    assert lost[0].reason is not None
    assert lost[0].reason.startswith("connection lost")


async def test_many_sessions_on_one_stream_end_when_all_are_done(
    relays: Relays, seed: Seeder
) -> None:
    """The multi-session stream (PROTOCOL §5.1): a snapshot per session, a SESSION_CLOSED for a
    session that appears with another owner (the stream goes on, and reconnections no longer ask
    for it: asked, it would make the whole stream a 403), the end once the others completed;
    resumed with the last cursor afterwards, 204: nothing, and a normal end."""
    done, pending, user, stranger = fresh("s"), fresh("s"), fresh("u"), fresh("u")
    await seed.start(done, user, 2)
    changes: list[StateChange] = []
    # Shorter than the relay's 1 s heartbeat: the client reconnects whenever nothing comes.
    events = stream(
        relays.url(1),
        token=token(user),
        sessions=[done, pending],
        idle_timeout=0.4,
        on_state=changes.append,
    )
    async with events:
        (snapshot,) = await take(events, 1)
        await seed.start(pending, stranger, 1)
        (closed,) = await take(events, 1)
        opened = sum(c.state == "open" for c in changes)
        await until(lambda: sum(c.state == "open" for c in changes) >= opened + 2)
        await seed.upload(done, "p1")
        await seed.fail(done, "p2", "corrupt")
        got = await rest(events)
    assert isinstance(snapshot, SessionSnapshot)
    assert snapshot.session_id == done
    assert closed == SessionClosed(session_id=pending, reason="forbidden")
    assert [type(e) for e in got] == [PhotoUploaded, PhotoFailed, SessionCompleted]
    assert events.close_reason == "completed"
    assert events.last_event_id is not None

    # (multi: a cursor resumes only the multi-session stream, even for one session)
    again = stream(
        relays.url(0),
        token=token(user),
        sessions=[done],
        multi=True,
        last_event_id=events.last_event_id,
    )
    assert await rest(again) == []
    assert again.close_reason == "completed"


async def test_too_many_sessions_are_a_typed_refusal(relays: Relays) -> None:
    sessions = [f"s{n}" for n in range(33)]  # RELAY_MAX_SESSIONS_PER_STREAM is 32
    with pytest.raises(StreamRefused) as refused:
        await rest(stream(relays.url(1), token=token(fresh("u")), sessions=sessions))
    assert (refused.value.reason, refused.value.status) == ("bad-request", 400)
    assert refused.value.detail  # the relay's own words


# Last in the module: the relay it kills is started again only if a later test needs it.
async def test_resumes_on_the_other_relay_after_a_kill_without_loss_or_repeat(
    relays: Relays, seed: Seeder
) -> None:
    """A session's own stream and a multi-session stream with the notifications, both on relay 0
    when it is killed, both moved to relay 1 by the client with their last id (the multi-session
    one a cursor): every log entry once, in order, and nothing resynchronised."""
    session, other, user = fresh("s"), fresh("s"), fresh("u")
    await seed.start(session, user, 20)
    await seed.start(other, user, 10)
    changes: list[StateChange] = []
    multi_changes: list[StateChange] = []
    both = [relays.url(0), relays.url(1)]
    single = stream(both, token=token(user), sessions=[session], on_state=changes.append)
    multi = stream(
        both,
        token=token(user),
        sessions=[session, other],
        notifications=True,
        on_state=multi_changes.append,
    )
    async with single, multi:
        first = await take(single, 1)
        got = await take(multi, 2)  # a snapshot per session, in the order asked
        await seed.upload_many(session, 5, prefix="a")
        await seed.upload_many(other, 3, prefix="a")
        first += await take(single, 5)
        got += await take(multi, 8)
        relays.procs[0].kill()
        # Logged while the clients are cut off: they must get them on resumption, once.
        await seed.upload_many(session, 5, prefix="b")
        await seed.upload_many(other, 3, prefix="b")
        await until(lambda: opened_on(changes, both[1]) and opened_on(multi_changes, both[1]))
        await seed.upload_many(session, 10, prefix="c")
        await seed.upload_many(other, 4, prefix="c")
        resumed = await rest(single)
        # 15 uploads and the completion of `session`, 7 and `other`'s, and two notifications.
        got += await take(multi, 16 + 8 + 2)

    assert isinstance(first[0], SessionSnapshot)
    log = [entry_id for entry_id, _ in await seed.entries(keys.session_log_key(session))]
    assert first[0].event_id == log[0]
    assert event_ids(first[1:] + resumed) == log[1:]
    assert isinstance(resumed[-1], SessionCompleted)
    reconnecting = [c for c in changes if c.state == "reconnecting"]
    assert reconnecting[0].url == relays.url(1)
    assert reconnecting[0].reason is not None
    assert reconnecting[0].reason.startswith("connection lost")
    assert reconnecting[0].retry_in == 0.1  # the relay's retry:

    assert [type(e) for e in got[:2]] == [SessionSnapshot, SessionSnapshot]
    assert [getattr(e, "session_id", None) for e in got[:2]] == [session, other]
    assert not [e for e in got[2:] if isinstance(e, SessionSnapshot)], "resynchronised"
    for sid in (session, other):
        entries = [entry_id for entry_id, _ in await seed.entries(keys.session_log_key(sid))]
        mine = [e for e in got if getattr(e, "session_id", None) == sid]
        assert mine[0].event_id == entries[0]  # type: ignore[union-attr]
        progress = [e for e in mine[1:] if not isinstance(e, Notification)]
        assert event_ids(progress) == entries[1:], sid
    notes = [e for e in got if isinstance(e, Notification)]
    notification_log = await seed.entries(keys.user_notifications_log_key(user))
    assert event_ids(notes) == [entry_id for entry_id, _ in notification_log]
    assert multi.last_event_id not in log  # the whole stream's cursor, not an entry id
    assert [c.url for c in multi_changes if c.state == "open"] == both
