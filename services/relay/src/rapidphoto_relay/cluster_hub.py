"""The relay's subscription on a Redis Cluster: sharded pub/sub, one connection per master (PROTOCOL §9).

The same promises as :class:`~rapidphoto_relay.hub.Hub`, whose interface this follows (``subscribe``
returns once Redis confirmed; ``unsubscribe``; ``ready``; streams asked to resync from their logs
after anything that may have lost a message), over ``SSUBSCRIBE``:

- Subscribers are the hub's (:class:`~rapidphoto_relay.fanout.Subscriber`: a stream's writer, or a
  lane of a multi-session stream).
- A sharded channel lives on the master that owns its slot, so the hub keeps one pub/sub connection
  (a :class:`_Link`) per master owning a subscribed slot, chosen from the slot map
  (``CLUSTER SLOTS``). ``SSUBSCRIBE`` takes channels of one slot per command: subscriptions are
  grouped by slot and the commands of a batch written together (pipelined).
- Whatever may have moved a channel re-reads the slot map and moves the affected channels to their
  owner, then resyncs their streams once the new subscription is confirmed (each subscriber's
  ``request_resync()``): a link that failed (a master killed, a network fault), an unsolicited
  ``sunsubscribe`` (Redis drops a slot's subscribers when the slot leaves the node: resharding, a
  fail-over that turned the master into a replica), a ``MOVED`` reply to ``SSUBSCRIBE``. While an
  owner is unreachable (a fail-over takes seconds) the map is read again with jittered backoff.
  Channels of other masters are never touched: their streams go on.
- ``ready``: every subscribed channel's owner is connected and its subscription confirmed.

redis-py's ``ClusterPubSub`` is not used: it polls node after node (late deliveries), and did not
recover from a killed master nor follow a ``sunsubscribe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisError, ResponseError

from rapidphoto_relay.fanout import Fanout, Subscriber
from rapidphoto_relay.hub import HubUnavailable
from rapidphoto_relay.metrics import RelayMetrics

log = logging.getLogger("rapidphoto_relay.cluster_hub")

#: How long a node that dropped a slot is not taken for its owner, whatever a slot map says.
STALE_SECONDS: Final = 10.0
#: Channels per SSUBSCRIBE (all of one slot) when many of a slot are subscribed at once.
SUBSCRIBE_CHUNK: Final = 500
_CONNECTION_ERRORS: Final = (RedisError, OSError)

Node = tuple[str, int]


def channel_slot(channel: str) -> int:
    return key_slot(channel.encode())


class SlotMap:
    """Slot -> master ``(host, port)``, from ``CLUSTER SLOTS`` of the first node that answers."""

    def __init__(self, seeds: Sequence[Node], connect_timeout: float) -> None:
        self._known: list[Node] = list(seeds)
        self._timeout = connect_timeout
        self._ranges: list[tuple[int, int, Node]] = []

    def owner(self, slot: int) -> Node | None:
        for start, end, node in self._ranges:
            if start <= slot <= end:
                return node
        return None

    async def refresh(self, **client_options: Any) -> None:
        """Read the map again; raises the last error when no known node answers."""
        last: Exception | None = None
        for host, port in list(self._known):
            # No retries: redis-py's default retries a refused connection for seconds, and the
            # first node tried may be the master that just died; the next one answers at once.
            client = aioredis.Redis(
                host=host,
                port=port,
                socket_connect_timeout=self._timeout,
                socket_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                **client_options,
            )
            try:
                reply = await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            except _CONNECTION_ERRORS as exc:
                last = exc
                continue
            finally:
                await client.aclose()
            self._ranges = []
            for start, end, master, *replicas in reply:
                node = (_text(master[0]) or host, int(master[1]))
                self._ranges.append((int(start), int(end), node))
                for other in (node, *((_text(r[0]) or host, int(r[1])) for r in replicas)):
                    if other not in self._known:
                        self._known.append(other)
            return
        raise last or RedisError("no cluster node known")


class _Channel:
    __slots__ = ("confirmed", "link", "needs_resync", "slot", "subscribers")

    def __init__(self, slot: int, confirmed: asyncio.Future[None]) -> None:
        self.slot = slot
        self.subscribers: set[Subscriber] = set()
        self.confirmed = confirmed
        self.link: _Link | None = None
        self.needs_resync = False


class _Link:
    """One pub/sub connection to one master, carrying the channels of its slots."""

    def __init__(self, hub: ClusterHub, node: Node) -> None:
        self.hub = hub
        self.node = node
        self.channels: set[str] = set()
        self.unacked: dict[str, int] = {}
        self.conn: AbstractConnection | None = None
        self.connected = False
        self.task: asyncio.Task[None] | None = None
        self.last_read = 0.0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"relay-shard-{self.node[1]}")

    async def _run(self) -> None:
        conn: AbstractConnection = Connection(
            host=self.node[0],
            port=self.node[1],
            socket_connect_timeout=self.hub.connect_timeout,
            socket_keepalive=True,
            health_check_interval=0,
            protocol=2,  # messages and replies as plain arrays (transport.py)
            client_name="rapidphoto-relay:shard",
            retry=Retry(NoBackoff(), 0),  # the hub reconnects, after re-reading the slot map
            **self.hub.connection_options,
        )
        self.conn = conn
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            self.connected = True
            await self.send_subscriptions("SSUBSCRIBE", list(self.channels))
            await self._read_loop(conn)
        except _CONNECTION_ERRORS as exc:
            log.warning(
                "shard pub/sub connection lost",
                extra={"node": f"{self.node[0]}:{self.node[1]}", "error": str(exc)},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shard pub/sub connection failed unexpectedly")
        finally:
            self.connected = False
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await conn.disconnect(nowait=True)
        self.hub._link_lost(self)

    async def send_subscriptions(self, command: str, channels: Iterable[str]) -> None:
        """``SSUBSCRIBE``/``SUNSUBSCRIBE`` the channels, one command per slot, pipelined."""
        conn = self.conn
        if conn is None or not self.connected:
            return  # (re)connecting: the connection subscribes whatever it carries by then
        by_slot: dict[int, list[str]] = defaultdict(list)
        for channel in channels:
            by_slot[channel_slot(channel)].append(channel)
        commands = []
        for names in by_slot.values():
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                chunk = names[start : start + SUBSCRIBE_CHUNK]
                for channel in chunk:  # counted before sending: a reply may come first
                    self.unacked[channel] = self.unacked.get(channel, 0) + 1
                commands.append((command, *chunk))
        if not commands:
            return
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except _CONNECTION_ERRORS as exc:
            log.warning("shard pub/sub write failed", extra={"error": str(exc)})
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await conn.disconnect(nowait=True)  # the reader fails and reports the loss

    async def _read_loop(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        keepalive = asyncio.create_task(self._keepalive(conn))
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=True)
                except MovedError as exc:  # an SSUBSCRIBE of a slot this node no longer owns
                    self.last_read = loop.time()
                    self.hub._slot_moved(self, exc.slot_id)
                    continue
                except ResponseError as exc:
                    self.last_read = loop.time()
                    log.warning("shard pub/sub error reply", extra={"error": str(exc)})
                    self.hub._topology_changed()
                    continue
                self.last_read = loop.time()
                try:
                    self.hub._handle(self, reply if isinstance(reply, list) else [reply])
                except Exception:
                    self.hub._fanout.failed(reply, b"smessage")
        finally:
            keepalive.cancel()

    async def _keepalive(self, conn: AbstractConnection) -> None:
        """PING a silent connection; close it if nothing comes back (hub.py's reasoning)."""
        loop = asyncio.get_running_loop()
        interval = self.hub.ping_interval
        while True:
            await asyncio.sleep(interval)
            if loop.time() - self.last_read < interval:
                continue
            pinged_at = loop.time()
            try:
                await conn.send_command("PING", check_health=False)
            except _CONNECTION_ERRORS:
                return
            await asyncio.sleep(interval)
            if self.last_read < pinged_at:
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.disconnect(nowait=True)
                return

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class ClusterHub:
    """The relay's sharded subscription; see the module docstring."""

    def __init__(
        self,
        seeds: Sequence[Node],
        metrics: RelayMetrics,
        *,
        ping_interval: float = 5.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 0.25,
        connect_timeout: float = 1.0,
        connection_options: dict[str, Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        #: AUTH, TLS and the like for every node (from REDIS_URL).
        self.connection_options = dict(connection_options or {})
        self._map = SlotMap(seeds, connect_timeout)
        self._jitter = EqualJitterBackoff(cap=backoff_cap, base=backoff_base)
        self._channels: dict[str, _Channel] = {}
        self._links: dict[Node, _Link] = {}
        self._dirty = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._map_ok = False
        self._closing = False
        self._fanout = Fanout(self.metrics, log)
        self._background: set[asyncio.Task[None]] = set()
        #: Slot -> (node, when): the node dropped the slot's subscriptions, so a slot map that
        #: still names it is older than what that node knows (nodes learn a fail-over or a
        #: resharding one after another). Not trusted for STALE_SECONDS.
        self._left: dict[int, tuple[Node, float]] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> ClusterHub:
        self._dirty.set()
        self._reconciler = asyncio.create_task(self._reconcile_loop(), name="relay-cluster-hub")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    @property
    def connected(self) -> bool:
        return self._map_ok

    @property
    def ready(self) -> bool:
        """The slot map is known, and every subscribed channel's owner is connected with every
        channel that needed a new subscription confirmed again (PROTOCOL §9)."""
        if not self._map_ok:
            return False
        for state in self._channels.values():
            if state.needs_resync or state.link is None or not state.link.connected:
                return False
        return True

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    # --- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, channel: str, subscriber: Subscriber, within: float = 5.0) -> None:
        """Add ``subscriber`` to ``channel``; return once its owner confirmed the subscription."""
        state = self._channels.get(channel)
        if state is None:
            state = _Channel(channel_slot(channel), asyncio.get_running_loop().create_future())
            self._channels[channel] = state
            self.metrics.subscribed_channels.set(len(self._channels))
            await self._place(channel, state)
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
        """Remove ``subscriber``; the last one out unsubscribes the channel (synchronous, as in
        hub.py; the SUNSUBSCRIBE is sent by a task)."""
        state = self._channels.get(channel)
        if state is None:
            return
        state.subscribers.discard(subscriber)
        if state.subscribers:
            return
        del self._channels[channel]
        self.metrics.subscribed_channels.set(len(self._channels))
        if not state.confirmed.done():
            state.confirmed.cancel()
        link = state.link
        if link is not None:
            link.channels.discard(channel)
            if link.connected:
                task = asyncio.create_task(link.send_subscriptions("SUNSUBSCRIBE", [channel]))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _place(self, channel: str, state: _Channel) -> None:
        """Put a channel on its owner's link (subscribing it), as far as the map knows it."""
        owner = self._map.owner(state.slot) if self._map_ok else None
        if owner is None:
            self._dirty.set()  # the reconciler places it once the map is read
            return
        link = self._link(owner)
        state.link = link
        link.channels.add(channel)
        await link.send_subscriptions("SSUBSCRIBE", [channel])

    def _link(self, node: Node) -> _Link:
        link = self._links.get(node)
        if link is None or link.task is None or link.task.done():
            link = _Link(self, node)
            self._links[node] = link
            link.start()
        return link

    # --- topology ------------------------------------------------------------------------------

    def _topology_changed(self) -> None:
        self._dirty.set()

    def _link_lost(self, link: _Link) -> None:
        """A link ended (its node died, the network failed): its channels move, and resync."""
        if self._closing:
            return
        if self._links.get(link.node) is link:
            del self._links[link.node]
        self._unconfirm(self._channels[c] for c in link.channels if c in self._channels)
        for channel in link.channels:
            state = self._channels.get(channel)
            if state is not None and state.link is link:
                state.link = None
        self.metrics.redis_reconnects.inc()
        self._dirty.set()

    def _slot_moved(self, link: _Link, slot: int) -> None:
        moved = [c for c in link.channels if channel_slot(c) == slot]
        self._detach(link, moved)

    def _detach(self, link: _Link, channels: Iterable[str]) -> None:
        now = asyncio.get_running_loop().time()
        for channel in list(channels):
            self._left[channel_slot(channel)] = (link.node, now)
            link.channels.discard(channel)
            link.unacked.pop(channel, None)
            state = self._channels.get(channel)
            if state is not None and state.link is link:
                state.link = None
                self._unconfirm([state])
        self._dirty.set()

    def _unconfirm(self, states: Iterable[_Channel]) -> None:
        loop = asyncio.get_running_loop()
        for state in states:
            state.needs_resync = True
            if state.confirmed.done():
                state.confirmed = loop.create_future()

    async def _reconcile_loop(self) -> None:
        """Whenever something moved: read the map, put every channel on its owner's link; again
        with backoff until every owner is reachable."""
        attempt = 0
        while not self._closing:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._map.refresh(**self.connection_options)
                self._map_ok = True
            except _CONNECTION_ERRORS as exc:
                log.warning("cluster slot map unreadable", extra={"error": str(exc)})
                self._map_ok = False
            if self._map_ok:
                await self._reconcile()
            if not self._settled():
                attempt += 1
                await asyncio.sleep(self._jitter.compute(min(attempt, 16)))
                self._dirty.set()
            else:
                attempt = 0

    def _settled(self) -> bool:
        """Every channel on a connected link (a link still connecting, or failing to, is looked
        at again after the backoff: a master that just died is refused until its replica takes
        over, which takes seconds)."""
        if not self._map_ok:
            return False
        return all(s.link is not None and s.link.connected for s in self._channels.values())

    def _owner(self, slot: int) -> Node | None:
        """The slot's master per the map, unless the map is older than the node that left it (a
        replica still serves SSUBSCRIBE for its master's slots: a stale map would go unnoticed)."""
        owner = self._map.owner(slot)
        left = self._left.get(slot)
        if left is not None:
            node, when = left
            if owner != node or asyncio.get_running_loop().time() - when > STALE_SECONDS:
                del self._left[slot]
            else:
                return None
        return owner

    async def _reconcile(self) -> None:
        moves: dict[Node, list[str]] = defaultdict(list)
        for channel, state in self._channels.items():
            owner = self._owner(state.slot)
            if owner is None:
                continue
            current = state.link
            if current is not None and current.node == owner and current is self._links.get(owner):
                continue
            if current is not None:  # owned elsewhere now: leave the old node
                current.channels.discard(channel)
                current.unacked.pop(channel, None)
                if current.connected:
                    await current.send_subscriptions("SUNSUBSCRIBE", [channel])
                self._unconfirm([state])
            moves[owner].append(channel)
        for node, channels in moves.items():
            link = self._link(node)
            for channel in channels:
                self._channels[channel].link = link
                link.channels.add(channel)
            await link.send_subscriptions("SSUBSCRIBE", channels)
        for node, link in list(self._links.items()):  # links left without channels
            if not link.channels:
                del self._links[node]
                await link.close()

    # --- messages ------------------------------------------------------------------------------

    def _handle(self, link: _Link, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"smessage":
            self._dispatch(reply[1], reply[2])
            return
        if kind not in (b"ssubscribe", b"sunsubscribe"):
            return  # pong: proof of life
        channel = _channel_name(reply[1])
        left = link.unacked.get(channel, 0) - 1
        if left >= 0:
            if left > 0:
                link.unacked[channel] = left
                return
            link.unacked.pop(channel, None)
            state = self._channels.get(channel)
            if kind == b"ssubscribe" and state is not None and state.link is link:
                self._confirm(state)
            return
        # Not an answer to a command of ours: Redis dropped the subscription (the slot left the
        # node: resharding, or a fail-over made it a replica).
        if kind == b"sunsubscribe":
            self._detach(link, [channel])

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
            return
        self._fanout.deliver(state.subscribers, channel, data)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _channel_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def node_options(redis_url: str) -> tuple[list[Node], dict[str, Any]]:
    """``REDIS_URL``, a cluster node, as the first node to ask for the slot map, and the
    credentials every node gets (TLS is not supported in cluster mode yet)."""
    options = parse_url(redis_url)
    seeds = [(str(options.get("host", "127.0.0.1")), int(options.get("port", 6379)))]
    credentials = {k: options[k] for k in ("username", "password") if options.get(k)}
    return seeds, credentials
