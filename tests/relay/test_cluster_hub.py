"""ClusterHub, the relay's sharded subscription (PROTOCOL §9), against a real local cluster: one
connection per master, third-party SPUBLISH delivered, and after a fail-over, a killed master or a
resharded slot, the affected channels move to their new owner and their streams resync; the
channels of other masters never notice."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from rapidphoto_contract import keys
from rapidphoto_relay.cluster_hub import ClusterHub
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.payload import Message
from tests.support.redis_cluster import RedisClusterNodes, migrate_slot, redis_cluster

pytestmark = pytest.mark.e2e


class Recorder:
    """Stands for a stream: what the hub pushed to it, and when it was asked to resync."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.messages: list[tuple[float, bytes]] = []
        self.resyncs: list[float] = []

    def push(self, message: Message) -> None:
        self.messages.append((time.monotonic(), message.frame))

    def request_resync(self) -> None:
        self.resyncs.append(time.monotonic())


@pytest.fixture(scope="module")
def nodes() -> Iterator[RedisClusterNodes]:
    with redis_cluster() as started:
        yield started


@pytest.fixture
async def hub(nodes: RedisClusterNodes) -> AsyncIterator[ClusterHub]:
    seeds = [("127.0.0.1", nodes.ports[0])]
    async with ClusterHub(seeds, RelayMetrics(), backoff_base=0.02, backoff_cap=0.2) as started:
        yield started


def channels_per_master(
    nodes: RedisClusterNodes, prefix: str, each: int = 2
) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {port: [] for port in nodes.masters()}
    n = 0
    while any(len(v) < each for v in found.values()):
        channel = keys.session_channel(f"{prefix}{n}")
        owner = nodes.owner_of(channel)
        if owner in found and len(found[owner]) < each:
            found[owner].append(channel)
        n += 1
    return found


async def subscribe_all(hub: ClusterHub, channels: list[str]) -> dict[str, Recorder]:
    recorders = {c: Recorder(c) for c in channels}
    for channel, recorder in recorders.items():
        await hub.subscribe(channel, recorder)
    return recorders


async def until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


class Publisher:
    """SPUBLISHes to each channel every 20 ms, as a third-party backend would (PROTOCOL §4), from a
    thread of its own (so the hub's event loop is measured alone), to each channel's owner; a
    channel whose owner fails looks its owner up again, the others go on."""

    def __init__(self, nodes: RedisClusterNodes, channels: list[str]) -> None:
        self.nodes = nodes
        self.channels = channels
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        owners: dict[str, redis.Redis] = {}
        n = 0
        while not self.stop.wait(0.02):
            n += 1
            for channel in self.channels:
                try:
                    if channel not in owners:
                        owners[channel] = redis.Redis(
                            port=self.nodes.owner_of(channel),
                            socket_timeout=0.2,
                            socket_connect_timeout=0.2,
                            retry=Retry(NoBackoff(), 0),  # not seconds of retries
                        )
                    owners[channel].execute_command(  # type: ignore[no-untyped-call]
                        "SPUBLISH", channel, b'{"type":"PING","n":%d}' % n
                    )
                except (redis.RedisError, LookupError):  # its master is down: look it up again
                    client = owners.pop(channel, None)
                    if client is not None:
                        client.close()
        for client in owners.values():
            client.close()

    async def __aenter__(self) -> Publisher:
        self.thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.to_thread(self.thread.join, 10)


#: The longest a stream of a healthy master may go without a message while another master fails
#: over or a slot moves: messages come every 20 ms, a resync or a reconnection would take longer
#: than this; what is left is scheduling noise on a loaded test machine.
HEALTHY_GAP_SECONDS = 1.0


def longest_gap(recorder: Recorder, since: float) -> float:
    times = [since] + [t for t, _ in recorder.messages if t >= since] + [time.monotonic()]
    return max(b - a for a, b in itertools.pairwise(times))


async def test_one_connection_per_master_and_third_party_spublish_reaches_the_streams(
    nodes: RedisClusterNodes, hub: ClusterHub
) -> None:
    by_master = channels_per_master(nodes, "a")
    channels = [c for cs in by_master.values() for c in cs]
    recorders = await subscribe_all(hub, channels)
    assert hub.ready
    assert sorted(port for _, port in hub._links) == sorted(by_master)
    async with aioredis.RedisCluster(host="127.0.0.1", port=nodes.ports[0]) as client:
        for channel in channels:
            await client.execute_command("SPUBLISH", channel, b'{"type":"X"}')
        # A plain PUBLISH is not delivered to sharded subscribers (PROTOCOL §9).
        await client.publish(channels[0], b'{"type":"NOT_SHARDED"}')
    await until(lambda: all(r.messages for r in recorders.values()), 5, "every channel's message")
    await asyncio.sleep(0.1)
    assert [len(r.messages) for r in recorders.values()] == [1] * len(channels)
    assert all(b"NOT_SHARDED" not in f for r in recorders.values() for _, f in r.messages)


async def test_a_cluster_failover_moves_only_its_channels_which_resync_within_a_second(
    nodes: RedisClusterNodes, hub: ClusterHub
) -> None:
    by_master = channels_per_master(nodes, "f")
    channels = [c for cs in by_master.values() for c in cs]
    recorders = await subscribe_all(hub, channels)
    victim = sorted(by_master)[0]
    moved = set(by_master[victim])
    async with Publisher(nodes, channels):
        await until(lambda: all(r.messages for r in recorders.values()), 5, "live messages")
        replica = nodes.replica_of(victim)
        began = time.monotonic()
        await asyncio.to_thread(nodes.client(replica).execute_command, "CLUSTER", "FAILOVER")
        await until(lambda: all(recorders[c].resyncs for c in moved), 5, "resync of moved channels")
        resumed = max(recorders[c].resyncs[0] for c in moved) - began
        await until(lambda: hub.ready, 5, "ready")
        after = time.monotonic()
        await until(
            lambda: all(any(t > after for t, _ in recorders[c].messages) for c in moved),
            5,
            "live messages from the new master",
        )
    assert resumed < 1.0, resumed
    for channel in set(channels) - moved:
        assert not recorders[channel].resyncs
        assert longest_gap(recorders[channel], began) < HEALTHY_GAP_SECONDS
    assert ("127.0.0.1", replica) in hub._links


async def test_a_resharded_slot_moves_its_channel_which_resyncs(
    nodes: RedisClusterNodes, hub: ClusterHub
) -> None:
    by_master = channels_per_master(nodes, "r", each=1)
    channels = [c for cs in by_master.values() for c in cs]
    recorders = await subscribe_all(hub, channels)
    source = sorted(by_master)[0]
    channel = by_master[source][0]
    target = next(p for p in nodes.masters() if p != source)
    async with Publisher(nodes, channels):
        await until(lambda: all(r.messages for r in recorders.values()), 5, "live messages")
        began = time.monotonic()
        steps = migrate_slot(nodes, key_slot(channel.encode()), source, target)
        await asyncio.to_thread(steps.begin)
        await asyncio.to_thread(steps.move_keys)
        handed_over = time.monotonic()
        await asyncio.to_thread(steps.finish)
        await until(lambda: recorders[channel].resyncs, 5, "resync of the moved channel")
        await until(lambda: hub.ready, 5, "ready")
        after = time.monotonic()
        await until(lambda: any(t > after for t, _ in recorders[channel].messages), 5, "live again")
    assert recorders[channel].resyncs[0] - handed_over < 1.0
    for other in set(channels) - {channel}:
        assert not recorders[other].resyncs
        assert longest_gap(recorders[other], began) < HEALTHY_GAP_SECONDS


async def test_a_killed_master_its_channels_resync_after_the_promotion_others_go_on(
    nodes: RedisClusterNodes, hub: ClusterHub
) -> None:
    """Runs last: the module's cluster is left with a master fewer."""
    by_master = channels_per_master(nodes, "k")
    channels = [c for cs in by_master.values() for c in cs]
    recorders = await subscribe_all(hub, channels)
    victim = sorted(by_master)[0]
    moved = set(by_master[victim])
    replica = nodes.replica_of(victim)
    async with Publisher(nodes, channels):
        await until(lambda: all(r.messages for r in recorders.values()), 5, "live messages")
        began = time.monotonic()
        await asyncio.to_thread(nodes.kill, victim)
        await until(lambda: not hub.ready, 2, "not ready while the owner is unreachable")
        await asyncio.to_thread(nodes.wait_master, replica, 15)  # the loop must go on
        promoted = time.monotonic()
        await until(lambda: all(recorders[c].resyncs for c in moved), 10, "resync after promotion")
        resumed = max(recorders[c].resyncs[0] for c in moved) - promoted
        await until(lambda: hub.ready, 5, "ready again")
    assert resumed < 5.0, resumed
    for channel in set(channels) - moved:
        assert not recorders[channel].resyncs
        assert longest_gap(recorders[channel], began) < HEALTHY_GAP_SECONDS
