"""What a job needs, built once per process in ``on_startup`` and kept in arq's ``ctx`` (CONVENTIONS §5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Self

import attrs
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options
from rapidphoto_contract.settings import WorkerConfig
from rapidphoto_worker.scripts import Scripts, load_scripts
from rapidphoto_worker.state import StateRedis

#: Where the :class:`WorkerContext` lives in arq's ``ctx`` dict.
CTX_KEY: Final = "rapidphoto"

# A Redis call must give up well before arq's job timeout (main.JOB_TIMEOUT_SECONDS, 10 s): a job that
# times out in arq is failed, not retried, while a Redis timeout here is retried by the command
# (commands.TRANSIENT_ERRORS). A connection Redis closed is replaced or the call sent again at once
# (redis_options: the scripts are idempotent); a timeout is not retried by the client. Worst case
# per call: connect 1 s + read 2 s + at most redis_options.MAX_RETRY_SECONDS of backoff, about 4 s.
SOCKET_CONNECT_TIMEOUT_SECONDS: Final = 1.0
SOCKET_TIMEOUT_SECONDS: Final = 2.0


@attrs.frozen(kw_only=True)
class WorkerContext:
    """The process's settings, the state's Redis (``str`` replies) and the loaded scripts."""

    settings: WorkerConfig
    state: StateRedis = attrs.field(repr=False)
    scripts: Scripts = attrs.field(repr=False)

    @classmethod
    async def create(cls, settings: WorkerConfig) -> Self:
        state = StateRedis(
            await state_client(settings),
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        try:
            scripts = await load_scripts(state)
        except BaseException:
            await state.aclose()
            raise
        return cls(settings=settings, state=state, scripts=scripts)

    async def aclose(self) -> None:
        await self.state.aclose()


async def state_client(settings: WorkerConfig) -> aioredis.Redis | RedisCluster:
    """The client of ``REDIS_URL``: a ``Redis``, or with ``REDIS_CLUSTER=1`` a ``RedisCluster``
    that has read the slot map (PROTOCOL §9)."""
    timeouts: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    }
    if not settings.redis_cluster:
        client = aioredis.Redis.from_url(settings.redis_url, **timeouts, **pool_options())
        cancel_safe(client.connection_pool)  # a cancelled job's Redis call ends with it
        return client
    # A failed command is the job's to retry (commands.TRANSIENT_ERRORS),
    # with backoff, by when a fail-over is over. A partly covered cluster (a master just died) is
    # still usable for the other slots.
    cluster = RedisCluster.from_url(settings.redis_url, **timeouts, require_full_coverage=False)
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    return cluster


def from_ctx(ctx: Mapping[str, Any]) -> WorkerContext:
    """The :class:`WorkerContext` that ``on_startup`` stored in arq's ``ctx``."""
    app = ctx.get(CTX_KEY)
    if not isinstance(app, WorkerContext):
        raise RuntimeError("worker context missing: on_startup did not run")
    return app
