"""The one Redis pub/sub subscription of a relay process, shared by all of its streams (PROTOCOL §1).

- Channels are reference counted: subscribed when their first local stream opens, unsubscribed when
  the last one closes. :meth:`Hub.subscribe` returns only once Redis has *confirmed* the
  subscription, so a stream that reads its log afterwards cannot miss an event published in between.
- One reader task reads the connection. Each message is validated and framed once
  (:mod:`rapidphoto_relay.payload`) and the same :class:`~rapidphoto_relay.payload.Message` is
  pushed to every local stream's :class:`~rapidphoto_relay.writer.StreamWriter` without waiting
  (CONVENTIONS §6): written to the connection at once, or queued in its bounded buffer.
- When the connection fails the hub reconnects with exponential backoff and full jitter, resubscribes
  every channel, and once each channel is confirmed asks its streams to resync from the event log
  (what they missed meanwhile; PROTOCOL §5). ``ready`` is false in between (``/health/ready`` is 503).
- A PING every ``ping_interval`` seconds of silence detects a dead link that never reports an error.

Confirmations are matched by counting: every SUBSCRIBE/UNSUBSCRIBE sent for a channel is answered
in order, so a channel is confirmed when the reply to the *last* command sent for it is a
``subscribe`` (an unsubscribe quickly followed by a subscribe must not be confirmed by a stale reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Final, Protocol

from redis.backoff import EqualJitterBackoff
from redis.exceptions import RedisError

from rapidphoto_relay.fanout import Fanout, Subscriber
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.transport import PubSubConnection, PubSubTransport

log = logging.getLogger("rapidphoto_relay.hub")

#: Channels per SUBSCRIBE command when resubscribing after a reconnection.
RESUBSCRIBE_CHUNK: Final = 500

#: What a broken or unreachable pub/sub connection raises. Not ``ValueError``: a payload that failed
#: to decode raised one, and was taken for a connection failure that dropped every stream's
#: subscription (issue 9, fault 1). Errors in one message are handled per message (``_read_loop``).
_CONNECTION_ERRORS: Final = (RedisError, OSError)


class Subscriptions(Protocol):
    """What streams need from a relay's subscription: :class:`Hub` on a standalone Redis,
    :class:`~rapidphoto_relay.cluster_hub.ClusterHub` on a cluster (PROTOCOL §9)."""

    @property
    def ready(self) -> bool: ...

    @property
    def channel_count(self) -> int: ...

    async def subscribe(
        self, channel: str, subscriber: Subscriber, within: float = 5.0
    ) -> None: ...

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None: ...


class HubUnavailable(Exception):
    """The subscription could not be confirmed in time (Redis down or slow)."""


class _Channel:
    __slots__ = ("confirmed", "needs_resync", "subscribers")

    def __init__(self, confirmed: asyncio.Future[None]) -> None:
        self.subscribers: set[Subscriber] = set()
        self.confirmed = confirmed
        #: Set while the connection is down: the channel's streams resync once it is confirmed again.
        self.needs_resync = False


class Hub:
    def __init__(
        self,
        transport: PubSubTransport,
        metrics: RelayMetrics,
        *,
        ping_interval: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._ping_interval = ping_interval
        self._jitter = EqualJitterBackoff(cap=backoff_cap, base=backoff_base)
        self._channels: dict[str, _Channel] = {}
        self._unacked: dict[str, int] = {}
        self._conn: PubSubConnection | None = None
        self._task: asyncio.Task[None] | None = None
        #: Channels whose last stream closed, unsubscribed in batches by one flusher task.
        self._to_unsubscribe: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        #: New channels, subscribed in batches by one task: a burst of streams opening in the same
        #: loop iteration costs one SUBSCRIBE (one write) instead of one each.
        self._to_subscribe: dict[str, None] = {}
        self._subscriber: asyncio.Task[None] | None = None
        self._closing = False
        self._last_read = 0.0
        self._fanout = Fanout(metrics, log)
        self.connected = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        self._task = asyncio.create_task(self._run(), name="relay-hub-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        for task in (self._task, self._flusher, self._subscriber):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._drop_connection()

    @property
    def ready(self) -> bool:
        """Connected, and every channel that was subscribed before an outage confirmed again.

        A channel whose first stream is still waiting for its confirmation does not count: a burst
        of new streams must not make a healthy relay look unready to its load balancer.
        """
        return self.connected and not any(ch.needs_resync for ch in self._channels.values())

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    # --- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, channel: str, subscriber: Subscriber, within: float = 5.0) -> None:
        """Add ``subscriber`` to ``channel``; return once Redis confirmed the subscription."""
        state = self._channels.get(channel)
        if state is None:
            state = _Channel(asyncio.get_running_loop().create_future())
            self._channels[channel] = state
            self._metrics.subscribed_channels.set(len(self._channels))
            # Still subscribed in Redis if its UNSUBSCRIBE was not flushed yet: cancel that, and
            # SUBSCRIBE again anyway, as its reply is the confirmation we wait for.
            self._to_unsubscribe.discard(channel)
            self._to_subscribe[channel] = None
            if self._subscriber is None or self._subscriber.done():
                self._subscriber = asyncio.create_task(self._flush_subscribes())
        state.subscribers.add(subscriber)
        if state.confirmed.done():
            return
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(state.confirmed)
        except TimeoutError:
            self.unsubscribe(channel, subscriber)
            raise HubUnavailable(f"subscription to {channel} not confirmed in {within}s") from None

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Remove ``subscriber``; the last one out unsubscribes the channel.

        Synchronous, so a stream's cleanup cannot be interrupted half way by a cancellation; the
        UNSUBSCRIBE itself is sent by a flusher task, batched when many streams close at once.
        """
        state = self._channels.get(channel)
        if state is None:
            return
        state.subscribers.discard(subscriber)
        if state.subscribers:
            return
        del self._channels[channel]
        self._metrics.subscribed_channels.set(len(self._channels))
        if not state.confirmed.done():
            state.confirmed.cancel()
        if channel in self._to_subscribe:
            del self._to_subscribe[channel]  # its SUBSCRIBE was never sent: nothing to undo
        elif self.connected:
            self._to_unsubscribe.add(channel)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_unsubscribes())

    async def _flush_unsubscribes(self) -> None:
        await asyncio.sleep(0)  # let a burst of closing streams accumulate
        while self._to_unsubscribe:
            names = [c for c in self._to_unsubscribe if c not in self._channels]
            self._to_unsubscribe.clear()
            for start in range(0, len(names), RESUBSCRIBE_CHUNK):
                await self._send_subscriptions(
                    "UNSUBSCRIBE", names[start : start + RESUBSCRIBE_CHUNK]
                )

    async def _flush_subscribes(self) -> None:
        await asyncio.sleep(0)  # let a burst of opening streams accumulate
        while self._to_subscribe:
            # A channel whose streams all left before the flush is not subscribed at all.
            names = [c for c in self._to_subscribe if c in self._channels]
            self._to_subscribe.clear()
            for start in range(0, len(names), RESUBSCRIBE_CHUNK):
                await self._send_subscriptions(
                    "SUBSCRIBE", names[start : start + RESUBSCRIBE_CHUNK]
                )

    async def _send_subscriptions(self, command: str, channels: list[str]) -> None:
        conn = self._conn
        if conn is None or not self.connected:
            return  # the reconnection resubscribes whatever channels exist by then
        for channel in channels:
            # Counted before sending: the reply may be read before our write call returns.
            self._unacked[channel] = self._unacked.get(channel, 0) + 1
        try:
            await conn.send(command, *channels)
        except _CONNECTION_ERRORS as exc:
            log.warning("pub/sub write failed", extra={"error": str(exc)})
            await self._drop_connection()

    # --- the reader ----------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                conn = await self._transport.connect()
            except Exception as exc:  # anything: retried with backoff, the reader must not die
                attempt += 1
                delay = self._backoff(attempt)
                log.warning(
                    "redis pub/sub unreachable, retrying",
                    extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
                continue
            if attempt > 0 or self._channels:
                self._metrics.redis_reconnects.inc()
            attempt = 0
            self._conn = conn
            self._unacked = {}
            self.connected = True
            log.info("redis pub/sub connected", extra={"channels": len(self._channels)})
            try:
                await self._resubscribe_all()
                await self._read_loop(conn)
            except _CONNECTION_ERRORS as exc:
                log.warning("redis pub/sub connection lost", extra={"error": str(exc)})
            except Exception:
                # Not a message's fault (those are handled one by one): something unexpected in
                # the connection itself. Reconnect rather than let the reader task die, which
                # would leave every stream of this relay silently without live events.
                log.exception("redis pub/sub connection failed unexpectedly")
            await self._drop_connection()
            attempt = 1
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        # Jittered (AWS architecture blog, "Exponential Backoff and Jitter"): relays restarted
        # together must not reconnect in lockstep. Capped exponent: a float overflows past 2**1023.
        return self._jitter.compute(min(attempt, 16))

    async def _resubscribe_all(self) -> None:
        names = list(self._channels)
        for start in range(0, len(names), RESUBSCRIBE_CHUNK):
            await self._send_subscriptions("SUBSCRIBE", names[start : start + RESUBSCRIBE_CHUNK])

    async def _read_loop(self, conn: PubSubConnection) -> None:
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        keepalive = asyncio.create_task(self._keepalive(conn), name="relay-hub-keepalive")
        try:
            while True:
                reply = await conn.read()
                self._last_read = loop.time()
                # Each message in isolation: whatever goes wrong with one (anyone may PUBLISH,
                # PROTOCOL §4) drops that one, never the connection every stream shares.
                try:
                    self._handle(reply)
                except Exception:
                    self._fanout.failed(reply, b"message")
        finally:
            keepalive.cancel()

    async def _keepalive(self, conn: PubSubConnection) -> None:
        """PING a connection silent for ``ping_interval``; close it if the PONG does not come.

        A link can die without an error (a NAT dropping state, a host gone): without this the
        reader would wait forever while every stream silently stops receiving.
        """
        loop = asyncio.get_running_loop()
        interval = self._ping_interval
        while True:
            await asyncio.sleep(interval)
            if loop.time() - self._last_read < interval:
                continue
            pinged_at = loop.time()
            try:
                await conn.send("PING")
            except _CONNECTION_ERRORS:
                return  # the reader sees the failure too
            await asyncio.sleep(interval)
            if self._last_read < pinged_at:  # nothing at all since the PING, not even its PONG
                log.warning("redis pub/sub silent, reconnecting", extra={"after_s": 2 * interval})
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.close()  # the pending read fails; the reader reconnects
                return

    def _handle(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            self._dispatch(reply[1], reply[2])
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = _channel_name(reply[1])
            left = self._unacked.get(channel, 0) - 1
            if left > 0:
                self._unacked[channel] = left
                return
            self._unacked.pop(channel, None)
            state = self._channels.get(channel)
            if kind == b"subscribe" and state is not None:
                self._confirm(state)
        # b"pong" and anything else: only proof of life

    def _confirm(self, state: _Channel) -> None:
        if not state.confirmed.done():
            state.confirmed.set_result(None)
        if state.needs_resync:
            state.needs_resync = False
            for subscriber in state.subscribers:
                subscriber.request_resync()

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        state = self._channels.get(_channel_name(channel))
        if state is None or not state.subscribers:
            return  # in flight while we unsubscribed
        self._fanout.deliver(state.subscribers, channel, data)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        was_connected, self.connected = self.connected, False
        self._to_unsubscribe.clear()  # a new connection starts with no subscriptions
        if was_connected:
            self._mark_all_for_resync(self._channels.values())
        if conn is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await conn.close()

    def _mark_all_for_resync(self, channels: Iterable[_Channel]) -> None:
        loop = asyncio.get_running_loop()
        for state in channels:
            state.needs_resync = True
            if state.confirmed.done():
                state.confirmed = loop.create_future()


def _channel_name(raw: bytes) -> str:
    """A channel name as the hub keys it. Ours are ASCII; anything else cannot raise here and
    matches no channel of ours."""
    return raw.decode("utf-8", "surrogateescape")
