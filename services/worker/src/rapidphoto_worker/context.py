"""What a job needs, built once per process in ``on_startup`` and kept in arq's ``ctx`` (CONVENTIONS §5)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final, Self

import attrs
import redis.asyncio as aioredis

from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options
from rapidphoto_contract.settings import WorkerConfig
from rapidphoto_worker.scripts import Scripts, load_scripts

#: Where the :class:`WorkerContext` lives in arq's ``ctx`` dict.
CTX_KEY: Final = "rapidphoto"

# A Redis call must give up well before arq's job timeout (main.JOB_TIMEOUT_SECONDS, 10 s): a job that
# times out in arq is failed, not retried, while a Redis timeout here is retried by the command
# (commands.TRANSIENT_ERRORS). A connection Redis closed is replaced or the call sent again at once
# (redis_options: the scripts are idempotent); a timeout is not retried by the client. Worst case
# per call: connect 1 s + read 2 s + at most redis_options.MAX_RETRY_SECONDS of backoff, about 4 s.
SOCKET_CONNECT_TIMEOUT_SECONDS: Final = 1.0
SOCKET_TIMEOUT_SECONDS: Final = 2.0


#: Sessions whose owner a process remembers (a few hundred bytes each).
OWNER_CACHE_SIZE: Final = 10_000


class OwnerCache:
    """Session id -> owner, most recently used kept.

    A photo command must name the owner's notification log in its script's KEYS, so it needs the
    owner before the script runs: a round trip per job, unless remembered. The owner of a session
    never changes once set; should the session expire and be started again by someone else, the
    script sees the mismatch, changes nothing, and the command forgets the entry and tries again.
    """

    def __init__(self, maxsize: int = OWNER_CACHE_SIZE) -> None:
        self._maxsize = maxsize
        self._owners: OrderedDict[str, str] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        owner = self._owners.get(session_id)
        if owner is not None:
            self._owners.move_to_end(session_id)
        return owner

    def put(self, session_id: str, owner: str) -> None:
        self._owners[session_id] = owner
        self._owners.move_to_end(session_id)
        if len(self._owners) > self._maxsize:
            self._owners.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._owners.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._owners)


@attrs.frozen(kw_only=True)
class WorkerContext:
    """The process's settings, its Redis client (``str`` replies), the loaded command scripts and
    the session owners it has seen."""

    settings: WorkerConfig
    redis: aioredis.Redis = attrs.field(repr=False)
    scripts: Scripts = attrs.field(repr=False)
    owners: OwnerCache = attrs.field(factory=OwnerCache, repr=False)

    @classmethod
    async def create(cls, settings: WorkerConfig) -> Self:
        client = aioredis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_SECONDS,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            **pool_options(),
        )
        cancel_safe(client.connection_pool)  # a cancelled job's Redis call ends with it
        try:
            scripts = await load_scripts(client)
        except BaseException:
            await client.aclose()
            raise
        return cls(settings=settings, redis=client, scripts=scripts)

    async def aclose(self) -> None:
        await self.redis.aclose()


def from_ctx(ctx: Mapping[str, Any]) -> WorkerContext:
    """The :class:`WorkerContext` that ``on_startup`` stored in arq's ``ctx``."""
    app = ctx.get(CTX_KEY)
    if not isinstance(app, WorkerContext):
        raise RuntimeError("worker context missing: on_startup did not run")
    return app
