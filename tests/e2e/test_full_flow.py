"""The whole path with nothing faked: the contract's ``UploadJobsClient`` enqueues, a real
``rapidphoto-worker`` applies, two real ``rapidphoto-relay`` processes stream, real clients read
(the suite's httpx SSE client on both relays, and ``curl -N`` once)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable

import pytest

from rapidphoto_tools.client import UploadJobsClient
from tests.e2e.conftest import (
    NOTIFICATION_STREAM,
    Cluster,
    Truth,
    assert_exactly_the_log,
    fresh,
    session_path,
)
from tests.support.sse import FrameSplitter, SSEFrame, open_sse

pytestmark = pytest.mark.e2e


async def _curl(url: str, token: str) -> list[SSEFrame]:
    """Every frame ``curl -N`` prints until the relay ends the stream."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed"
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-N",
        "--max-time",
        "60",
        "-H",
        f"Authorization: Bearer {token}",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, f"curl failed ({proc.returncode}): {err.decode()}"
    return FrameSplitter().feed(out)


async def test_every_client_on_both_relays_sees_every_event_once_in_order(
    cluster_factory: Callable[[str], Cluster],
    redis_url: str,
    jobs: UploadJobsClient,
    truth: Truth,
) -> None:
    cluster = cluster_factory(redis_url).start(relays=2)
    a, b = cluster.relays
    session, user = fresh("s"), fresh("u")
    token = cluster.token(user)
    total = 10

    await jobs.start_upload_session(session, user, total_photos=total)
    await truth.wait_status(session, "IN_PROGRESS")
    path = session_path(session)
    async with (
        open_sse(a.base_url, path, token=token) as on_a,
        open_sse(b.base_url, path, token=token, via="cookie") as on_b,
        open_sse(a.base_url, NOTIFICATION_STREAM, token=token, via="query") as notes_a,
        open_sse(b.base_url, NOTIFICATION_STREAM, token=token) as notes_b,
    ):
        assert {s.status_code for s in (on_a, on_b, notes_a, notes_b)} == {200}
        snapshots = [await on_a.next_event(), await on_b.next_event()]
        await notes_a.next_frame()  # retry: written after the subscription is confirmed
        await notes_b.next_frame()
        curl = asyncio.create_task(_curl(b.base_url + path, token))

        def curl_subscribed() -> bool:
            return b.open_streams() >= 3  # session + notifications from the httpx clients, + curl

        await _until(curl_subscribed, "curl's stream open on relay b")

        # 3 failures, 6 uploads and a duplicate of one of them (a job delivered twice) ...
        for n in range(3):
            await jobs.fail_photo_upload(session, f"p{n}", f"corrupt file #{n}")
        for n in range(3, 9):
            await jobs.complete_photo_upload(session, f"p{n}")
        await jobs.complete_photo_upload(session, "p3")
        await truth.wait_counts(session, uploaded=6, failed=3)
        # ... then a failed photo uploaded after all (it leaves the failures), then the last one.
        await jobs.complete_photo_upload(session, "p0")
        await truth.wait_counts(session, uploaded=7, failed=2)
        await jobs.complete_photo_upload(session, "p9")

        ends = await asyncio.gather(on_a.wait_ended(20), on_b.wait_ended(20))
        curl_frames = await asyncio.wait_for(curl, 20)
        note_a = await notes_a.next_event(10)
        note_b = await notes_b.next_event(10)
        await notes_a.expect_silence(0.2)
        await notes_b.expect_silence(0.2)

    log = await truth.log(session)
    # SESSION_STARTED, 3 PHOTO_FAILED, 6 + 2 PHOTO_UPLOADED (the duplicate is not there), COMPLETED
    types = [e.type for e in log]
    assert len(log) == 13
    assert types[0] == "SESSION_STARTED"
    assert sorted(types[1:10]) == ["PHOTO_FAILED"] * 3 + ["PHOTO_UPLOADED"] * 6
    assert types[10:] == ["PHOTO_UPLOADED", "PHOTO_UPLOADED", "SESSION_COMPLETED"]
    assert [log[10].event["photoId"], log[11].event["photoId"]] == ["p0", "p9"]
    assert await truth.counts(session) == (8, 2, "COMPLETED")

    started_id = log[0].id
    for name, snapshot in zip(("a", "b"), snapshots, strict=True):
        assert snapshot.event == "SESSION_SNAPSHOT", name
        assert snapshot.id == started_id, name
        assert snapshot.json()["uploadedPhotos"] == 0
    clients = {"httpx@a": ends[0], "httpx(cookie)@b": ends[1]}
    curl_events = [f for f in curl_frames if f.is_event]
    assert curl_events[0].event == "SESSION_SNAPSHOT"
    assert curl_events[0].id == started_id
    clients["curl@b"] = curl_events[1:]
    streams: dict[str, list[SSEFrame]] = {}
    for name, frames in clients.items():
        events = [f for f in frames if f.is_event]
        assert events[-1].event == "STREAM_CLOSED", name
        assert events[-1].json() == {"type": "STREAM_CLOSED", "reason": "completed"}, name
        streams[name] = events[:-1]
        assert_exactly_the_log(streams[name], log, after=started_id, client=name)
    # Each relay frames an event once and hands every stream the same bytes; so do both relays.
    raws = {name: [f.raw for f in events] for name, events in streams.items()}
    assert raws["httpx@a"] == raws["httpx(cookie)@b"] == raws["curl@b"]
    assert len(raws["curl@b"]) == 12

    notifications = await truth.notifications(user)
    assert len(notifications) == 1
    for note in (note_a, note_b):
        assert (note.event, note.id, note.data) == (
            "notification",
            notifications[0].id,
            notifications[0].data,
        )
        body = note.json()
        assert (body["kind"], body["sessionId"]) == ("UPLOAD_SESSION_COMPLETED", session)
        assert (body["uploadedPhotos"], body["failedPhotos"], body["totalPhotos"]) == (8, 2, 10)


async def _until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await asyncio.to_thread(check):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)
