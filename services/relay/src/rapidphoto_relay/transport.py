"""The pub/sub transport seam (CONVENTIONS §3): what the hub needs from Redis, as a ``Protocol``.

The hub drives one connection itself rather than using redis-py's ``PubSub`` object, because it must
(1) know when Redis has *confirmed* a SUBSCRIBE before a stream reads its log (else an event could fall
in the gap between the log read and the subscription), (2) block on a connection that has no
subscriptions yet (``PubSub.listen()`` returns at once then, ``get_message()`` raises), and
(3) own reconnection: redis-py's automatic resubscribe does not replay what was missed.

:class:`RedisTransport` is the real implementation over one redis-py ``Connection`` (which does the
URL parsing, AUTH, TLS and the RESP parser, hiredis when installed). Unit tests of the hub use an
in-memory fake of the same protocol; everything else runs against real Redis.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection, ConnectionPool

from rapidphoto_contract.redis_cancel import cancel_safe


class PubSubConnection(Protocol):
    """One connection in subscriber mode (RESP2 replies as lists of bytes)."""

    async def send(self, *args: str | bytes) -> None:
        """Write one command (``SUBSCRIBE``, ``UNSUBSCRIBE``, ``PING``); raises on a broken link."""

    async def read(self) -> list[Any]:
        """The next reply or push message; raises when the connection fails or is closed."""

    async def close(self) -> None: ...


class PubSubTransport(Protocol):
    async def connect(self) -> PubSubConnection:
        """A new, authenticated connection; raises ``redis.ConnectionError`` when unreachable."""


class _RedisConnection:
    def __init__(self, conn: AbstractConnection) -> None:
        self._conn = conn

    async def send(self, *args: str | bytes) -> None:
        # check_health=False: a health check would PING and read the reply itself, racing the
        # hub's reader for the socket.
        await self._conn.send_command(*args, check_health=False)

    async def read(self) -> list[Any]:
        # No per-read timeout (it would cost a timer per message): the hub's keepalive task
        # PINGs a silent connection and closes it when no reply comes.
        reply = await self._conn.read_response(timeout=math.inf, disconnect_on_error=True)
        if not isinstance(reply, list):
            return [reply]  # PING's reply before any subscription: a simple string
        return reply

    async def close(self) -> None:
        await self._conn.disconnect(nowait=True)


class RedisTransport:
    def __init__(self, redis_url: str, connect_timeout: float = 2.0) -> None:
        # cancel_safe: the hub's reader, cancelled at shutdown while it resubscribes, must end.
        self._pool = cancel_safe(
            ConnectionPool.from_url(
                redis_url,
                socket_connect_timeout=connect_timeout,
                socket_keepalive=True,
                health_check_interval=0,
                # RESP2: messages and subscription replies are plain arrays that read_response
                # returns. Under RESP3 they are push frames that redis-py routes to its handlers.
                protocol=2,
                client_name="rapidphoto-relay:pubsub",  # CLIENT LIST shows who is who
            )
        )

    async def connect(self) -> PubSubConnection:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        return _RedisConnection(conn)

    async def aclose(self) -> None:
        await self._pool.disconnect()
