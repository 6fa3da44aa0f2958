"""Fixtures of the worker suite: the worker's context on the test's Redis, and a harness that runs
commands and checks, byte for byte, what each one appended to the logs and published."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import attrs
import pytest
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.events import Event
from rapidphoto_contract.jobs import CompletePhotoUpload, FailPhotoUpload, StartUploadSession
from rapidphoto_worker import commands
from rapidphoto_worker.commands import CommandResult
from rapidphoto_worker.context import WorkerContext
from tests.support.worker import (
    ChannelRecorder,
    log_entries,
    worker_context,
    worker_settings,
)

SESSION = "s1"
USER = "u1"
OCCURRED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
async def app(redis_url: str) -> AsyncIterator[WorkerContext]:
    async with worker_context(worker_settings(redis_url)) as ctx:
        yield ctx


@attrs.define
class Harness:
    """Runs commands on session ``s1`` of user ``u1`` and checks their events.

    :meth:`expect` asserts that, since its previous call, exactly the given events were appended to
    the session log (and the user's notification log) and published on the session (and user)
    channel, once each, in order, the published payload equal to the log entry's ``data`` and to the
    contract's ``to_json()`` of the expected event with ``eventId`` = the entry id.
    """

    app: WorkerContext
    redis: aioredis.Redis
    recorder: ChannelRecorder | None = None
    _seen: dict[str, int] = attrs.field(factory=dict)

    async def start(self, total: int, user: str = USER, session: str = SESSION) -> CommandResult:
        cmd = StartUploadSession(session_id=session, user_id=user, total_photos=total)
        return await commands.start_upload_session(self.app, cmd)

    async def upload(self, photo: str, session: str = SESSION) -> CommandResult:
        cmd = CompletePhotoUpload(session_id=session, photo_id=photo)
        return await commands.complete_photo_upload(self.app, cmd)

    async def fail(
        self, photo: str, reason: str = "corrupt", session: str = SESSION
    ) -> CommandResult:
        cmd = FailPhotoUpload(session_id=session, photo_id=photo, reason=reason)
        return await commands.fail_photo_upload(self.app, cmd)

    async def state(self, session: str = SESSION) -> dict[str, str]:
        return await self.redis.hgetall(keys.session_state_key(session))  # type: ignore[return-value]

    async def photos(self, session: str = SESSION) -> dict[str, str]:
        return await self.redis.hgetall(keys.session_photos_key(session))  # type: ignore[return-value]

    async def failures(self, session: str = SESSION) -> list[tuple[str, float]]:
        raw = await self.redis.zrange(keys.session_failures_key(session), 0, -1, withscores=True)
        return [(str(member), float(score)) for member, score in cast(list[Any], raw)]

    async def _new_entries(self, key: str) -> list[tuple[str, str, str]]:
        entries = await log_entries(self.redis, key)
        new = entries[self._seen.get(key, 0) :]
        self._seen[key] = len(entries)
        return new

    async def expect(
        self, session_events: Sequence[Event], notifications: Sequence[Event] = ()
    ) -> list[str]:
        """Check the events since the last call (see the class docstring); returns their ids."""
        assert self.recorder is not None, "this harness has no recorder"
        published = await self.recorder.published()
        ids = []
        for key, channel, expected in (
            (keys.session_log_key(SESSION), keys.session_channel(SESSION), session_events),
            (
                keys.user_notifications_log_key(USER),
                keys.notification_channel(USER),
                notifications,
            ),
        ):
            entries = await self._new_entries(key)
            assert [data for _, _, data in entries] == published[channel], (
                "published payloads differ from the log entries"
            )
            assert len(entries) == len(expected), [t for _, t, _ in entries]
            for (entry_id, event_type, data), event in zip(entries, expected, strict=True):
                payload = json.loads(data)
                assert payload["eventId"] == entry_id
                assert OCCURRED_AT.fullmatch(payload["occurredAt"])
                occurred = dt.datetime.fromisoformat(payload["occurredAt"].replace("Z", "+00:00"))
                entry_ms = int(entry_id.split("-")[0])
                if entry_ms < 10**13:  # not a test's made-up id from the future
                    assert abs(occurred.timestamp() * 1000 - entry_ms) < 2000
                assert event_type == event.TYPE
                want = attrs.evolve(
                    cast(Any, event), event_id=entry_id, occurred_at=payload["occurredAt"]
                )
                assert data == want.to_json()
                ids.append(entry_id)
        return ids


@pytest.fixture
async def h(
    app: WorkerContext, redis_client: aioredis.Redis, redis_url: str
) -> AsyncIterator[Harness]:
    """A :class:`Harness` subscribed to the session's and the user's channels."""
    channels = (keys.session_channel(SESSION), keys.notification_channel(USER))
    async with ChannelRecorder(redis_url, *channels) as recorder:
        yield Harness(app, redis_client, recorder)
