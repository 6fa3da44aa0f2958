"""Redis CPU per worker command and per relay delivery, on 1 master versus 3, and the spread over
the masters (issue 13, PROTOCOL §9).

For each layout, a local cluster (1 master + 1 replica, or 3 masters + 3 replicas), the worker's
real commands run in-process in cluster mode (``REDIS_WAIT_REPLICAS=1``) over many sessions, and a
``ClusterHub`` (the relay's sharded subscription) subscribed to every session's channel counts the
deliveries. Each master's ``used_cpu_sys + used_cpu_user`` (INFO cpu) and its ``EVALSHA`` calls
(INFO commandstats) are read before and after: CPU per command is the masters' CPU over the
commands (``net``: less what the masters use idle over the same time, measured just before:
cluster bus, cron, replication pings), and the spread is each master's share of the commands and
of the CPU.

    uv run python loadtests/cluster_cpu.py --sessions 60 --photos 50 --out loadtests/results/cluster-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arq import Retry  # noqa: E402
from tests.support.redis_cluster import RedisClusterNodes  # noqa: E402
from tests.support.worker import worker_context, worker_settings  # noqa: E402

from rapidphoto_contract import keys  # noqa: E402
from rapidphoto_contract.jobs import CompletePhotoUpload, StartUploadSession  # noqa: E402
from rapidphoto_relay.cluster_hub import ClusterHub  # noqa: E402
from rapidphoto_relay.metrics import RelayMetrics  # noqa: E402
from rapidphoto_relay.payload import Message  # noqa: E402
from rapidphoto_worker import commands  # noqa: E402

CONCURRENCY = 50
IDLE_SECONDS = 2.0


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def push(self, message: Message) -> None:
        self.count += 1

    def request_resync(self) -> None:
        pass


def master_stats(nodes: RedisClusterNodes) -> dict[int, tuple[float, int]]:
    """Per master: CPU seconds used so far, EVALSHA calls so far."""
    out = {}
    for port in nodes.masters():
        with nodes.client(port) as c:
            cpu = c.info("cpu")
            stats = c.info("commandstats")
        calls = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        out[port] = (float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), calls)
    return out


async def run_layout(masters: int, sessions: int, photos: int) -> dict[str, Any]:
    nodes = RedisClusterNodes(masters=masters)
    try:
        nodes.start()
        settings = worker_settings(
            nodes.url,
            redis_cluster=True,
            queue_redis_url="redis://127.0.0.1:1/0",
            redis_wait_replicas=1,
        )
        ids = [f"cpu-{masters}-{n}" for n in range(sessions)]
        counter = Counter()
        async with (
            worker_context(settings) as app,
            ClusterHub([("127.0.0.1", nodes.ports[0])], RelayMetrics()) as hub,
        ):
            for sid in ids:
                await hub.subscribe(keys.session_channel(sid), counter, within=10)
            for sid in ids:
                cmd = StartUploadSession(session_id=sid, user_id="u", total_photos=photos)
                await commands.start_upload_session(app, cmd)
            await asyncio.sleep(0.5)
            # What the masters use doing nothing (cluster bus, cron, replication pings), to tell
            # the commands' own CPU from the layout's fixed cost.
            idle_before, idle_began = master_stats(nodes), time.monotonic()
            await asyncio.sleep(IDLE_SECONDS)
            idle_after, idle_elapsed = master_stats(nodes), time.monotonic() - idle_began
            idle_rate = {
                p: (idle_after[p][0] - idle_before[p][0]) / idle_elapsed for p in idle_after
            }
            before, delivered_before = master_stats(nodes), counter.count
            began = time.monotonic()
            queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            for n in range(photos):
                for sid in ids:
                    queue.put_nowait((sid, f"p{n}"))
            total = queue.qsize()

            async def work() -> None:
                while not queue.empty():
                    sid, photo = queue.get_nowait()
                    cmd = CompletePhotoUpload(session_id=sid, photo_id=photo)
                    try:
                        await commands.complete_photo_upload(app, cmd)
                    except Retry:  # e.g. a replica slower than REDIS_WAIT_TIMEOUT_MS: again
                        queue.put_nowait((sid, photo))
                        await asyncio.sleep(0.05)

            await asyncio.gather(*(work() for _ in range(CONCURRENCY)))
            elapsed = time.monotonic() - began
            expected = delivered_before + total + sessions  # + each SESSION_COMPLETED
            deadline = time.monotonic() + 30
            while counter.count < expected and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # (the deliveries still in flight)
            after = master_stats(nodes)
            delivered = counter.count - delivered_before
    finally:
        nodes.stop()
    cpu = {p: after[p][0] - before[p][0] for p in after}
    calls = {p: after[p][1] - before[p][1] for p in after}
    total_cpu, total_calls = sum(cpu.values()), sum(calls.values())
    idle_cpu = sum(idle_rate.values()) * elapsed
    net_cpu = max(total_cpu - idle_cpu, 0.0)
    return {
        "masters": masters,
        "commands": total,
        "evalsha_calls": total_calls,
        "deliveries": delivered,
        "seconds": round(elapsed, 2),
        "commands_per_s": round(total / elapsed),
        "redis_cpu_s": round(total_cpu, 3),
        "redis_cpu_us_per_command": round(total_cpu / total * 1e6, 1),
        "redis_cpu_us_per_delivery": round(total_cpu / max(delivered, 1) * 1e6, 1),
        "idle_cpu_s_per_s": round(sum(idle_rate.values()), 4),
        "net_cpu_us_per_command": round(net_cpu / total * 1e6, 1),
        "per_master": [
            {
                "port": p,
                "share_of_commands": round(calls[p] / max(total_calls, 1), 3),
                "share_of_cpu": round(cpu[p] / max(total_cpu, 1e-9), 3),
                "cpu_s": round(cpu[p], 3),
            }
            for p in sorted(cpu)
        ],
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = [await run_layout(m, args.sessions, args.photos) for m in (1, 3)]
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
