"""Session state for relay tests, written by the *real* worker code run in-process.

The relay must be tested against exactly what the worker writes (state hash, failures set, photos
hash, logs and the published bytes), so :class:`Seeder` calls ``rapidphoto_worker.commands`` — the
same Lua scripts the arq jobs run — instead of imitating them. Raw publishes (other backends
integrating, PROTOCOL §4) go through :meth:`Seeder.publish_raw`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import redis.asyncio as aioredis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import CompletePhotoUpload, FailPhotoUpload, StartUploadSession
from rapidphoto_contract.settings import WorkerConfig
from rapidphoto_worker import commands
from rapidphoto_worker.commands import CommandResult
from rapidphoto_worker.context import WorkerContext


class Seeder:
    def __init__(self, ctx: WorkerContext, raw: aioredis.Redis) -> None:
        self.ctx = ctx
        self.redis = raw

    async def start(self, session_id: str, user_id: str, total: int) -> CommandResult:
        return await commands.start_upload_session(
            self.ctx,
            StartUploadSession(session_id=session_id, user_id=user_id, total_photos=total),
        )

    async def upload(self, session_id: str, photo_id: str) -> CommandResult:
        return await commands.complete_photo_upload(
            self.ctx, CompletePhotoUpload(session_id=session_id, photo_id=photo_id)
        )

    async def fail(self, session_id: str, photo_id: str, reason: str) -> CommandResult:
        return await commands.fail_photo_upload(
            self.ctx, FailPhotoUpload(session_id=session_id, photo_id=photo_id, reason=reason)
        )

    async def upload_many(self, session_id: str, count: int, prefix: str = "p") -> list[str]:
        """Upload ``count`` photos; returns every log entry id appended, in order."""
        ids: list[str] = []
        for n in range(count):
            ids.extend((await self.upload(session_id, f"{prefix}{n}")).event_ids)
        return ids

    async def publish_raw(self, channel: str, payload: str | bytes) -> int:
        return int(await self.redis.publish(channel, payload))

    async def entries(self, key: str) -> list[tuple[str, str]]:
        """``(entry id, data)`` of every entry of a log: the exact bytes that were published."""
        raw: list[tuple[str, dict[str, str]]] = await self.redis.xrange(key)  # type: ignore[assignment]
        return [(entry_id, fields[keys.LOG_FIELD_DATA]) for entry_id, fields in raw]

    async def log_ids(self, session_id: str) -> list[str]:
        return [entry_id for entry_id, _ in await self.entries(keys.session_log_key(session_id))]

    async def notification_ids(self, user_id: str) -> list[str]:
        key = keys.user_notifications_log_key(user_id)
        return [entry_id for entry_id, _ in await self.entries(key)]


@asynccontextmanager
async def seeder(redis_url: str, **settings: Any) -> AsyncIterator[Seeder]:
    """A :class:`Seeder` on ``redis_url``; ``settings`` override e.g. ``session_log_maxlen``."""
    ctx = await WorkerContext.create(attrs.evolve(WorkerConfig(redis_url=redis_url), **settings))
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield Seeder(ctx, raw)
    finally:
        await raw.aclose()
        await ctx.aclose()
