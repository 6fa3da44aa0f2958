"""A real local Redis Cluster for tests: 3 masters and 3 replicas on loopback, never a fake.

Started with ``redis-server --cluster-enabled yes`` processes and ``redis-cli --cluster create``
(ready in about 2 s), stopped by PID, its folder (nodes.conf files) removed. Each node's port and
its bus port (``--cluster-port``) are leased (``scripts.stack.free_cluster_ports``). Tests
that kill, fail over or reshard take a cluster of their own (one per test module at most: each
costs seconds of the suite's time).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.retry import Retry
from scripts.stack import (
    cluster_create_argv,
    cluster_node_argv,
    free_cluster_ports,
    wait_cluster_ready,
)

from tests.support.redis_server import wait_for_redis

MASTERS = 3


class RedisClusterNodes:
    """Six cluster nodes (``MASTERS`` masters, one replica each) as child processes."""

    def __init__(self, masters: int = MASTERS) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/setup installs it)")
        self.binary = binary
        pairs = free_cluster_ports(masters * 2)
        self.ports = [port for port, _ in pairs]
        self.bus_ports = dict(pairs)
        self.masters_count = masters
        self.dir = Path(tempfile.mkdtemp(prefix="rapidphoto-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``REDIS_URL`` of the cluster: any one node (the clients discover the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 20.0) -> None:
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            wait_for_redis(self.node_url(port))
        if self.masters_count == 1:
            self._one_master()
        else:
            subprocess.run(
                cluster_create_argv(self.ports), check=True, capture_output=True, timeout=timeout
            )
        wait_cluster_ready(self.ports, timeout)

    def _one_master(self) -> None:
        """One master with every slot and one replica (redis-cli creates 3 masters at least)."""
        master, replica = self.ports
        with self.client(master) as m, self.client(replica) as r:
            m.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            r.execute_command("CLUSTER", "MEET", "127.0.0.1", master, self.bus_ports[master])
            master_id = m.execute_command("CLUSTER", "MYID")
            deadline = time.monotonic() + 10
            while True:
                try:
                    r.execute_command("CLUSTER", "REPLICATE", master_id)
                    break
                except redis.ResponseError:  # the replica does not know the master yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def _spawn(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            cluster_node_argv(self.binary, port, self.bus_ports[port], self.dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (``str`` replies), for CLUSTER commands and inspection."""
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            decode_responses=True,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),  # a dead node: an error at once, not seconds of retries
        )

    def cluster_client(self) -> SyncRedisCluster:
        return SyncRedisCluster(host="127.0.0.1", port=self.live_ports()[0], decode_responses=True)

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def roles(self) -> dict[int, str]:
        """Port -> ``master`` / ``slave`` as each live node says of itself."""
        out: dict[int, str] = {}
        for port in self.live_ports():
            with self.client(port) as c:
                out[port] = str(c.info("replication")["role"])
        return out

    def masters(self) -> list[int]:
        return sorted(port for port, role in self.roles().items() if role == "master")

    def owner_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now (as a live node sees it)."""
        with self.client(self.live_ports()[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise LookupError(f"slot of {key!r} is not served")

    def replica_of(self, master_port: int) -> int:
        for port in self.live_ports():
            with self.client(port) as c:
                info = c.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == master_port:
                    return port
        raise LookupError(f"no replica of {master_port}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (its memory is gone, like a crashed server)."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def wait_master(self, port: int, timeout: float = 15.0) -> None:
        """Until the node on ``port`` is a master that every live node's slot map agrees on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                agreed = True
                for other in self.live_ports():
                    with self.client(other) as c:
                        slots = c.execute_command("CLUSTER", "SLOTS")
                    if not any(int(entry[2][1]) == port for entry in slots):
                        agreed = False
                if agreed:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"node {port} did not become a master within {timeout}s")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A started cluster for the block, stopped (every process, every file) after it."""
    nodes = RedisClusterNodes()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def migrate_slot(nodes: RedisClusterNodes, slot: int, source: int, target: int) -> MigrationSteps:
    """The steps of moving one slot (what ``redis-cli --cluster reshard`` does per slot)."""
    return MigrationSteps(nodes, slot, source, target)


class MigrationSteps:
    """``CLUSTER SETSLOT`` IMPORTING/MIGRATING, ``MIGRATE`` of the slot's keys, then ``SETSLOT
    NODE`` everywhere: separate calls, so a test can act between them (the keys moved, the slot
    not yet handed over: clients get ``ASK``)."""

    def __init__(self, nodes: RedisClusterNodes, slot: int, source: int, target: int) -> None:
        self.nodes, self.slot, self.source, self.target = nodes, slot, source, target
        with nodes.client(source) as s, nodes.client(target) as t:
            self.source_id = str(s.execute_command("CLUSTER", "MYID"))
            self.target_id = str(t.execute_command("CLUSTER", "MYID"))

    def begin(self) -> None:
        with self.nodes.client(self.target) as t:
            t.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        with self.nodes.client(self.source) as s:
            s.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def move_keys(self) -> int:
        moved = 0
        with self.nodes.client(self.source) as s:
            while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100):
                s.execute_command("MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
        return moved

    def finish(self) -> None:
        # The target first, then the source, then the other masters (as redis-cli does; replicas
        # refuse SETSLOT and learn it from their masters).
        order = [self.target, self.source] + [
            p for p in self.nodes.masters() if p not in (self.target, self.source)
        ]
        for port in order:
            with self.nodes.client(port) as c:
                c.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)

    def run(self) -> None:
        self.begin()
        self.move_keys()
        self.finish()
