"""Everything a request handler needs, built once per process in the app's lifespan (CONVENTIONS §5)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay.cluster_hub import ClusterHub, node_options
from rapidphoto_relay.cluster_reads import SlotRouter
from rapidphoto_relay.coalescer import Coalescer
from rapidphoto_relay.hub import Hub, Subscriptions
from rapidphoto_relay.limits import ConnectionLimits
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.registry import StreamRegistry
from rapidphoto_relay.replay import LogReader
from rapidphoto_relay.round_trips import SharedRoundTrips
from rapidphoto_relay.transport import RedisTransport

#: Commands (log reads, snapshots) share a bounded pool: a burst of 1,000 connecting clients waits
#: for a connection instead of opening 1,000 of them to Redis.
COMMAND_POOL_SIZE = 32


#: How long the readiness check waits for Redis to answer.
PING_TIMEOUT_SECONDS = 1.0


@attrs.define(kw_only=True)
class RelayServices:
    settings: RelayConfig
    #: The reads' client: a ``RedisCluster`` in cluster mode, which routes each read by slot.
    redis: aioredis.Redis
    hub: Subscriptions  # (one type, not a union: Litestar's signature models refuse unions)
    reader: LogReader
    registry: StreamRegistry
    limits: ConnectionLimits
    metrics: RelayMetrics
    coalescer: Coalescer = attrs.field(factory=Coalescer)

    async def redis_reachable(self) -> bool:
        """Standalone: Redis answers a PING. Cluster: the slot map is readable (what must be
        reachable besides is every subscribed slot's owner, which ``hub.ready`` says; a master
        holding none of our channels may be down without this relay being unready, PROTOCOL §9)."""
        if isinstance(self.hub, ClusterHub):
            return self.hub.connected
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False


@contextlib.asynccontextmanager
async def open_services(
    settings: RelayConfig, metrics: RelayMetrics
) -> AsyncIterator[RelayServices]:
    if settings.redis_cluster:
        async with _cluster_services(settings, metrics) as services:
            yield services
        return
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
            _services(settings, metrics, redis, hub) as services,
        ):
            yield services
    finally:
        await transport.aclose()
        await redis.aclose()
        await pool.aclose()


@contextlib.asynccontextmanager
async def _cluster_services(
    settings: RelayConfig, metrics: RelayMetrics
) -> AsyncIterator[RelayServices]:
    """PROTOCOL §9: the sharded ClusterHub, and reads routed by slot (cluster_reads)."""
    seeds, credentials = node_options(settings.redis_url)
    router = SlotRouter(
        seeds, max_connections=COMMAND_POOL_SIZE, client_options=credentials, socket_timeout=5
    )
    # The scripts' registration needs a client; the reads go through the router's.
    anchor = aioredis.Redis(host=seeds[0][0], port=seeds[0][1], **credentials)
    try:
        async with (
            ClusterHub(seeds, metrics, connection_options=credentials) as hub,
            _services(settings, metrics, anchor, hub, router) as services,
        ):
            yield services
    finally:
        await router.aclose()
        await anchor.aclose()


@contextlib.asynccontextmanager
async def _services(
    settings: RelayConfig,
    metrics: RelayMetrics,
    redis: aioredis.Redis,
    hub: Subscriptions,
    router: SlotRouter | None = None,
) -> AsyncIterator[RelayServices]:
    async with StreamRegistry(
        settings.sse_heartbeat_seconds, settings.jwt_leeway_seconds
    ) as registry:
        yield RelayServices(
            settings=settings,
            redis=redis,
            hub=hub,
            reader=LogReader(redis, router),
            registry=registry,
            limits=ConnectionLimits(
                settings.relay_max_connections,
                settings.relay_max_connections_per_user,
                settings.sse_retry_ms,
            ),
            metrics=metrics,
        )
