"""The relay's reads on a Redis Cluster, routed by slot (PROTOCOL §9).

Every read of a stream touches one session's (or one user's) keys, all in one slot, so it goes to
the master that owns that slot, over a plain client of that master (a bounded pool each), chosen
from the slot map (``CLUSTER SLOTS``, :class:`~rapidphoto_relay.cluster_hub.SlotMap`).

Not redis-py's ``RedisCluster``: after a connection error on *one* node it marks the whole client
for re-initialisation, and every later command, to any node, first re-reads the slot map and the
command table under one lock, with backoff while the dead master is still in the map. Measured:
while a master was failing over, streams of the healthy masters waited seconds to open. Here a
failed read re-reads the map (at most every REFRESH_INTERVAL_SECONDS, in the background) and
fails alone; a ``MOVED`` re-reads it and is tried again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    MovedError,
    RedisError,
    TimeoutError,
    TryAgainError,
)

from rapidphoto_relay.cluster_hub import Node, SlotMap

T = TypeVar("T")

#: The map is read again at most this often after failed reads.
REFRESH_INTERVAL_SECONDS: Final = 0.1
#: Errors after which the slot map may be stale: read it again.
_TOPOLOGY_ERRORS: Final = (ConnectionError, TimeoutError, ClusterDownError, TryAgainError, OSError)


class SlotRouter:
    """One bounded client per master; :meth:`run` sends a read to the owner of its key's slot."""

    def __init__(
        self,
        seeds: list[Node],
        *,
        max_connections: int,
        connect_timeout: float = 1.0,
        socket_timeout: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._map = SlotMap(seeds, connect_timeout)
        self._options = dict(client_options or {})
        self._pool_options: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "client_name": "rapidphoto-relay",
            "retry": Retry(NoBackoff(), 0),  # a dead master: an error now, not seconds of retries
            **self._options,
        }
        self._clients: dict[Node, aioredis.Redis] = {}
        self._loaded = False
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            if not force and self._loaded and now - self._refreshed < REFRESH_INTERVAL_SECONDS:
                return
            self._refreshed = now
            await self._map.refresh(**self._options)
            self._loaded = True

    def _refresh_soon(self) -> None:
        async def refresh() -> None:
            with contextlib.suppress(RedisError, OSError):
                await self.refresh()

        task = asyncio.create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def client_for(self, key: str) -> aioredis.Redis:
        """The client of the master that owns ``key``'s slot (the map is read on first use)."""
        if not self._loaded:
            await self.refresh()
        node = self._map.owner(key_slot(key.encode()))
        if node is None:
            self._refresh_soon()
            raise ClusterDownError(f"the slot of {key} is not served")
        client = self._clients.get(node)
        if client is None:
            pool = aioredis.BlockingConnectionPool(host=node[0], port=node[1], **self._pool_options)
            client = aioredis.Redis(connection_pool=pool)
            self._clients[node] = client
        return client

    async def run(self, key: str, read: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``read`` on the owner of ``key``; after a ``MOVED``, once more on the new owner."""
        for attempt in range(2):
            client = await self.client_for(key)
            try:
                return await read(client)
            except MovedError:
                if attempt:
                    raise
                await self.refresh(force=True)
            except _TOPOLOGY_ERRORS:
                self._refresh_soon()
                raise
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        """The slot map can be read (some node answers)."""
        try:
            await self.refresh(force=True)
        except (RedisError, OSError):
            return False
        return True

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        for client in self._clients.values():
            await client.aclose()
            await client.connection_pool.disconnect()
        self._clients.clear()
