"""Time from a Redis Cluster master's death to its streams being live again (PROTOCOL §9), N times.

A local 3-master/3-replica cluster (tests/support/redis_cluster.py), a relay process in cluster mode,
sessions on every master with the product's client streaming each, and a publisher thread that
``SPUBLISH``es a small payload on every session's channel every 20 ms (as another backend would,
PROTOCOL §4). Each round SIGKILLs the master of one shard, waits for its replica's promotion, and
records, for the streams of that master: death -> first live message (the silence clients saw),
promotion -> first live message (the relay's part), and, for the streams of the other masters,
their longest gap during the round. The killed node is then started again (it rejoins as a replica,
empty, and resyncs) before the next round.

    uv run python loadtests/cluster_failover.py --rounds 10 --out loadtests/results/cluster-failover
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.processes import start_relay  # noqa: E402
from tests.support.redis_cluster import RedisClusterNodes  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402
from tests.support.worker import worker_context, worker_settings  # noqa: E402

from rapidphoto_contract import keys  # noqa: E402
from rapidphoto_contract.jobs import StartUploadSession  # noqa: E402
from rapidphoto_contract.tokens import mint_token  # noqa: E402
from rapidphoto_tools.realtime import OtherEvent, stream  # noqa: E402
from rapidphoto_worker import commands  # noqa: E402

SECRET = "cluster-failover-secret-at-least-32-bytes"
USER = "failover-user"
PUBLISH_EVERY = 0.02


class Publisher(threading.Thread):
    """SPUBLISH {"type":"PING","t":<send time>} on each channel every PUBLISH_EVERY seconds."""

    def __init__(self, nodes: RedisClusterNodes, channels: list[str]) -> None:
        super().__init__(daemon=True)
        self.nodes, self.channels = nodes, channels
        self.stop = threading.Event()

    def run(self) -> None:
        owners: dict[str, redis.Redis] = {}
        while not self.stop.wait(PUBLISH_EVERY):
            for channel in self.channels:
                try:
                    if channel not in owners:
                        owners[channel] = redis.Redis(
                            port=self.nodes.owner_of(channel),
                            socket_timeout=0.2,
                            socket_connect_timeout=0.2,
                            retry=Retry(NoBackoff(), 0),
                        )
                    payload = json.dumps({"type": "PING", "t": time.time()})
                    owners[channel].execute_command("SPUBLISH", channel, payload)  # type: ignore[no-untyped-call]
                except (redis.RedisError, LookupError):
                    client = owners.pop(channel, None)
                    if client is not None:
                        client.close()


class Watch:
    """The live PINGs of one session's stream: when each arrived (monotonic) and was sent (wall)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.times: list[float] = []
        self.sent: list[float] = []

    async def run(self, url: str, token: str) -> None:
        async with stream(url, token=token, sessions=[self.session_id], max_backoff=0.5) as events:
            async for event in events:
                if isinstance(event, OtherEvent) and event.type == "PING":
                    self.times.append(time.monotonic())
                    self.sent.append(float(event.payload["t"]))

    def first_sent_after(self, wall: float) -> float | None:
        """When the first PING published after ``wall`` arrived: the stream live again."""
        return next((t for t, s in zip(self.times, self.sent, strict=True) if s > wall), None)

    def longest_gap(self, since: float, until: float) -> float:
        marks = [since, *(x for x in self.times if since <= x <= until), until]
        return max(b - a for a, b in itertools.pairwise(marks))


async def until(predicate: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def replica_synced(nodes: RedisClusterNodes, port: int) -> bool:
    try:
        with nodes.client(port) as c:
            info = c.info("replication")
    except redis.RedisError:
        return False
    return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sessions-per-master", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    queue = RedisServer()
    queue.start()
    nodes = RedisClusterNodes()
    log_dir = Path(nodes.dir) / "logs"
    log_dir.mkdir()
    rounds: list[dict[str, float]] = []
    try:
        nodes.start()
        relay_port = free_port()
        relay = start_relay(
            nodes.url,
            relay_port,
            log_dir,
            REDIS_CLUSTER="1",
            QUEUE_REDIS_URL=queue.url,
            JWT_SECRET=SECRET,
        )
        settings = worker_settings(nodes.url, redis_cluster=True, queue_redis_url=queue.url)
        sessions: dict[int, list[str]] = {p: [] for p in nodes.masters()}
        n = 0
        while any(len(v) < args.sessions_per_master for v in sessions.values()):
            sid = f"fo-{n}"
            owner = nodes.owner_of(keys.session_channel(sid))
            if len(sessions[owner]) < args.sessions_per_master:
                sessions[owner].append(sid)
            n += 1
        all_sessions = [s for ss in sessions.values() for s in ss]
        async with worker_context(settings) as app:
            for sid in all_sessions:
                cmd = StartUploadSession(session_id=sid, user_id=USER, total_photos=10)
                await commands.start_upload_session(app, cmd)
        token = mint_token(USER, key=SECRET, ttl_seconds=3600)
        watches = {sid: Watch(sid) for sid in all_sessions}
        tasks = [
            asyncio.create_task(w.run(f"http://127.0.0.1:{relay_port}", token))
            for w in watches.values()
        ]
        publisher = Publisher(nodes, [keys.session_channel(s) for s in all_sessions])
        publisher.start()
        await until(lambda: all(w.times for w in watches.values()), 20)
        for number in range(args.rounds):
            owner_now = {sid: nodes.owner_of(keys.session_channel(sid)) for sid in all_sessions}
            victim = sorted(set(owner_now.values()))[number % 3]
            replica = nodes.replica_of(victim)
            mine = [watches[s] for s in all_sessions if owner_now[s] == victim]
            others = [watches[s] for s in all_sessions if owner_now[s] != victim]
            await asyncio.sleep(0.5)
            died, died_wall = time.monotonic(), time.time()
            nodes.kill(victim)
            await asyncio.to_thread(nodes.wait_master, replica, 30)
            promoted = time.monotonic()
            await until(lambda m=mine, d=died_wall: all(w.first_sent_after(d) for w in m), 30)
            live = max(w.first_sent_after(died_wall) or 0.0 for w in mine)
            end = time.monotonic()
            rounds.append(
                {
                    "death_to_promotion_s": round(promoted - died, 3),
                    "death_to_live_s": round(live - died, 3),
                    "promotion_to_live_s": round(live - promoted, 3),
                    "others_longest_gap_s": round(max(w.longest_gap(died, end) for w in others), 3),
                }
            )
            print(f"round {number + 1}: {rounds[-1]}", flush=True)
            nodes._spawn(victim)  # back, empty: it rejoins as a replica and resyncs
            await asyncio.to_thread(_wait_synced, nodes, victim)
        publisher.stop.set()
        publisher.join(5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        relay.stop()
    finally:
        nodes.stop()
        queue.stop()
    summary = {
        key: {
            "median": round(statistics.median(r[key] for r in rounds), 3),
            "worst": round(max(r[key] for r in rounds), 3),
        }
        for key in rounds[0]
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rounds.json").write_text(
            json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n"
        )
    return 0


def _wait_synced(nodes: RedisClusterNodes, port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not replica_synced(nodes, port):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
