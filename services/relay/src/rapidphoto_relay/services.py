"""Everything a request handler needs, built once per process in the app's lifespan (CONVENTIONS §5)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import attrs
import redis.asyncio as aioredis

from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay.coalescer import Coalescer
from rapidphoto_relay.hub import Hub
from rapidphoto_relay.limits import ConnectionLimits
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.registry import StreamRegistry
from rapidphoto_relay.replay import LogReader
from rapidphoto_relay.round_trips import SharedRoundTrips
from rapidphoto_relay.transport import RedisTransport

#: Commands (log reads, snapshots) share a bounded pool: a burst of 1,000 connecting clients waits
#: for a connection instead of opening 1,000 of them to Redis.
COMMAND_POOL_SIZE = 32


@attrs.define(kw_only=True)
class RelayServices:
    settings: RelayConfig
    redis: aioredis.Redis
    hub: Hub
    reader: LogReader
    registry: StreamRegistry
    limits: ConnectionLimits
    metrics: RelayMetrics
    coalescer: Coalescer = attrs.field(factory=Coalescer)


@contextlib.asynccontextmanager
async def open_services(
    settings: RelayConfig, metrics: RelayMetrics
) -> AsyncIterator[RelayServices]:
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=COMMAND_POOL_SIZE,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        client_name="rapidphoto-relay",
        # Only reads go through this pool, so a command may be sent again on a new connection:
        # a stream opened just after a Redis restart gets 200, not 503 (redis_options).
        **pool_options(),
    )
    # Reads issued in the same instant (a burst of stream opens) share one pipeline.
    redis = SharedRoundTrips(connection_pool=cancel_safe(pool))
    transport = RedisTransport(settings.redis_url)
    try:
        async with (
            Hub(transport, metrics) as hub,
            StreamRegistry(settings.sse_heartbeat_seconds, settings.jwt_leeway_seconds) as registry,
        ):
            yield RelayServices(
                settings=settings,
                redis=redis,
                hub=hub,
                reader=LogReader(redis),
                registry=registry,
                limits=ConnectionLimits(
                    settings.relay_max_connections,
                    settings.relay_max_connections_per_user,
                    settings.sse_retry_ms,
                ),
                metrics=metrics,
            )
    finally:
        await transport.aclose()
        await redis.aclose()
        await pool.aclose()
