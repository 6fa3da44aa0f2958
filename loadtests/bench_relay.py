"""Benchmark of one relay process: fan-out throughput, latency, CPU per delivery, memory per stream.

Starts a private ``redis-server`` and a ``rapidphoto-relay`` (pinned to CPU 1 with ``taskset`` when
there is more than one CPU; this script and Redis stay on CPU 0), opens N streams on C notification
channels with a minimal raw-socket SSE client (an ``asyncio.Protocol``: no HTTP library, so the
client costs as little as possible), publishes at R events/s directly to Redis (payloads built by the
contract's ``events``, each with an ``eventId``/``occurredAt``) and reports:

- deliveries/s, lost and duplicated events (every stream checks its channel's sequence),
- p50 / p99 / max latency from PUBLISH to the event's arrival at the client,
- relay CPU-seconds per 1,000 deliveries (``utime + stime`` from ``/proc/<pid>/stat``),
- relay RSS per open stream (RSS with streams open minus RSS before, over N).

Scenarios (``--scenario``): ``fanout`` 1,000 streams on 1,000 channels at 100 ev/s (total);
``broadcast`` 1,000 streams on ONE channel at 100 ev/s (100,000 deliveries/s); ``idle`` 10,000
idle streams (``ulimit -n`` is raised in-process with ``resource.setrlimit``); ``all`` runs the three.

    uv run python loadtests/bench_relay.py --scenario all
    uv run python loadtests/bench_relay.py --streams 2000 --channels 10 --rate 50 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import redis.asyncio as aioredis
import uvloop

from rapidphoto_contract.events import Notification
from rapidphoto_contract.keys import notification_channel
from rapidphoto_contract.tokens import mint_token

SECRET: Final = "bench-secret-bench-secret-bench-secret-0123"
PATH: Final = "/api/upload/sessions/notifications/stream"
_ID: Final = re.compile(rb"\nid: (\d+)-(\d+)\n")
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Totals:
    """Shared by all streams of a run; ``sent_at[channel][seq]`` is the publish time."""

    sent_at: list[list[float]]
    latencies: array[float] = field(default_factory=lambda: array("d"))
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0


class StreamClient(asyncio.Protocol):
    """One SSE stream: sends the request, checks the status, counts its events.

    A *probe* stream parses every frame: sequence checks (lost, duplicate) and latency. The others
    only count ``id:`` lines with ``bytes.count`` (C speed): with 1,000 streams on one channel the
    client would otherwise need more CPU than the relay, and its own backlog would be measured as
    latency. Their count must still equal what was published.
    """

    def __init__(self, request: bytes, channel: int, totals: Totals, probe: bool = True) -> None:
        self.request = request
        self.channel = channel
        self.totals = totals
        self.probe = probe
        self.counted = 0
        self.tail = b""
        self.opened: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.head = True
        self.expected = 0  # next sequence number of this stream's channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it is one.
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if self.head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = int(buffer.split(b" ", 2)[1])
            buffer = buffer[end + 4 :]
            self.head = False
            if status != 200:
                self.opened.set_result(status)
                return
        if not self.opened.done():
            if b"retry:" not in buffer:
                self.buffer = buffer
                return
            self.opened.set_result(200)
        if not self.probe:
            # "id: " is 4 bytes: a match split across reads has at most 3 bytes in the tail.
            joined = self.tail + buffer
            self.counted += joined.count(b"id: ") - self.tail.count(b"id: ")
            self.tail, self.buffer = joined[-3:], b""
            return
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self.buffer = buffer
            return
        block, self.buffer = buffer[: end + 1], buffer[end + 2 :]
        if b"id: " not in block:
            return  # heartbeats and the retry frame
        now = time.perf_counter()
        totals = self.totals
        sent = totals.sent_at[self.channel]
        for match in _ID.finditer(b"\n" + block):
            seq = int(match.group(2))
            if seq < self.expected:
                totals.duplicates += 1
                continue
            if seq > self.expected:
                totals.lost += seq - self.expected
            self.expected = seq + 1
            totals.delivered += 1
            totals.latencies.append(now - sent[seq])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(0)
        if not self.closed.done():
            self.closed.set_result(None)


async def open_streams(
    port: int, count: int, channels: int, totals: Totals, batch: int = 500, probes: int = 10**9
) -> list[StreamClient]:
    loop = asyncio.get_running_loop()
    tokens = [mint_token(f"bench{c}", key=SECRET, ttl_seconds=3600) for c in range(channels)]
    requests = [
        (
            f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {tokens[c]}\r\n\r\n"
        ).encode()
        for c in range(channels)
    ]
    clients: list[StreamClient] = []
    for start in range(0, count, batch):
        made = []
        for n in range(start, min(count, start + batch)):
            channel = n % channels
            client = StreamClient(requests[channel], channel, totals, probe=n < probes)
            made.append(client)
            await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
        statuses = await asyncio.wait_for(asyncio.gather(*(c.opened for c in made)), 60)
        bad = [s for s in statuses if s != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} streams refused, e.g. status {bad[0]}")
        clients += made
    return clients


# --- the publisher -------------------------------------------------------------------------------


def occurred_at() -> str:
    t = dt.datetime.now(dt.UTC)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"


async def publish(
    redis: aioredis.Redis, channels: int, rate: float, duration: float, totals: Totals
) -> int:
    """``rate`` events/s in total, round-robin over the channels, for ``duration`` seconds."""
    names = [notification_channel(f"bench{c}") for c in range(channels)]
    tick = 0.01
    owed = 0.0
    sent = 0
    channel = 0
    start = time.perf_counter()
    next_tick = start
    while time.perf_counter() - start < duration:
        owed += rate * tick
        count, owed = int(owed), owed - int(owed)
        if count:
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(count):
                    seq = len(totals.sent_at[channel])
                    payload = Notification(
                        event_id=f"1-{seq}",
                        occurred_at=occurred_at(),
                        kind="BENCH",
                        user_id=f"bench{channel}",
                        session_id="bench",
                        total_photos=1,
                        uploaded_photos=1,
                        failed_photos=0,
                    ).to_json()
                    totals.sent_at[channel].append(time.perf_counter())
                    pipe.publish(names[channel], payload)
                    channel = (channel + 1) % channels
                    sent += 1
                await pipe.execute()
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    return sent


# --- a run ---------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    streams: int
    channels: int
    rate: float
    published: int = 0
    delivered: int = 0
    expected: int = 0
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    cpu_s: float = 0.0
    rss_per_stream_kib: float = 0.0
    idle_cpu_s_per_min: float = 0.0
    probes: int = 0
    client_cpu_s: float = 0.0

    def show(self) -> None:
        print(f"\n== {self.name}: {self.streams} streams on {self.channels} channel(s)")
        print(f"   relay RSS per open stream: {self.rss_per_stream_kib:.1f} KiB")
        if self.rate == 0:
            print(f"   idle relay CPU: {self.idle_cpu_s_per_min:.3f} CPU-s per minute")
            return
        per_s = self.delivered / self.seconds if self.seconds else 0.0
        print(
            f"   published {self.published} at {self.rate:g} ev/s; delivered {self.delivered}"
            f" of {self.expected} ({per_s:,.0f} deliveries/s)"
        )
        print(f"   lost {self.lost}, duplicates {self.duplicates}")
        print(
            f"   latency publish->client ({self.probes} probe streams): p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms,"
            f" max {self.max_ms:.2f} ms"
        )
        if self.delivered:
            per_1000 = self.cpu_s / self.delivered * 1000
            print(
                f"   relay CPU: {self.cpu_s:.2f} s = {per_1000:.4f} CPU-s per 1,000 deliveries"
                f" ({per_1000 * 1000:.1f} us per delivery);"
                f" this client used {self.client_cpu_s:.2f} CPU-s in {self.seconds:.1f} s"
            )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(
    name: str,
    redis_url: str,
    streams: int,
    channels: int,
    rate: float,
    duration: float,
    env_extra: dict[str, str],
    log_dir: Path,
    probes: int,
) -> Result:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "RELAY_", "SSE_"))},
        "REDIS_URL": redis_url,
        "JWT_SECRET": SECRET,
        "RELAY_MAX_CONNECTIONS": str(max(10_000, streams + 100)),
        "RELAY_MAX_CONNECTIONS_PER_USER": str(streams + 100),
        **env_extra,
    }
    relay_bin = Path(sys.executable).parent / "rapidphoto-relay"
    log = (log_dir / f"relay-{name}.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [*pinned(1), str(relay_bin), "--port", str(port)], env=env, stdout=log, stderr=log
    )
    result = Result(name, streams, channels, rate, probes=min(probes, streams))
    try:
        await wait_ready(port, proc)
        # warm up: a few streams, so imports and first-use allocations are not counted per stream
        warm_totals = Totals([[] for _ in range(channels)])
        warm = await open_streams(port, min(50, streams), channels, warm_totals)
        for client in warm:
            assert client.transport is not None
            client.transport.close()
        await asyncio.sleep(1.5)
        rss_before = rss_kib(proc.pid)
        totals = Totals([[] for _ in range(channels)])
        clients = await open_streams(port, streams, channels, totals, probes=probes)
        probe_clients = [c for c in clients if c.probe]
        counters = [c for c in clients if not c.probe]
        await asyncio.sleep(1.0)
        result.rss_per_stream_kib = (rss_kib(proc.pid) - rss_before) / streams
        cpu_before = cpu_seconds(proc.pid)
        client_before = cpu_seconds(os.getpid())
        started = time.perf_counter()
        if rate > 0:
            async with aioredis.Redis.from_url(redis_url) as redis:
                result.published = await publish(redis, channels, rate, duration, totals)
            per_channel = [len(s) for s in totals.sent_at]
            result.expected = sum(per_channel[c.channel] for c in clients)

            def arrived() -> int:
                return totals.delivered + totals.lost + sum(c.counted for c in counters)

            # drain: until everything arrived or nothing moved for 2 s
            last, quiet_since = -1, time.perf_counter()
            while arrived() < result.expected:
                await asyncio.sleep(0.05)
                if arrived() != last:
                    last, quiet_since = arrived(), time.perf_counter()
                elif time.perf_counter() - quiet_since > 2:
                    break
        else:
            await asyncio.sleep(duration)
        result.seconds = time.perf_counter() - started
        result.cpu_s = cpu_seconds(proc.pid) - cpu_before
        result.client_cpu_s = cpu_seconds(os.getpid()) - client_before
        if rate == 0:
            result.idle_cpu_s_per_min = result.cpu_s / result.seconds * 60
        counted = sum(c.counted for c in counters)
        result.delivered = totals.delivered + counted
        result.duplicates = totals.duplicates
        result.lost = totals.lost + sum(
            len(totals.sent_at[c.channel]) - c.expected for c in probe_clients
        )
        # counting streams: a shortfall is loss, an excess duplicates
        shortfall = sum(len(totals.sent_at[c.channel]) for c in counters) - counted
        result.lost += max(0, shortfall)
        result.duplicates += max(0, -shortfall)
        ordered = sorted(totals.latencies)
        result.p50_ms = percentile(ordered, 0.50) * 1000
        result.p99_ms = percentile(ordered, 0.99) * 1000
        result.max_ms = (ordered[-1] if ordered else 0.0) * 1000
        for client in clients:
            assert client.transport is not None
            client.transport.close()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()
    return result


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("relay exited during start-up")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await reader.read(64)
            writer.close()
            if b" 200 " in head:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("relay not ready after 30 s")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [
            *pinned(0),
            binary,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            folder,
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


SCENARIOS: Final[dict[str, dict[str, float]]] = {
    "fanout": {"streams": 1000, "channels": 1000, "rate": 100.0},
    "broadcast": {"streams": 1000, "channels": 1, "rate": 100.0},
    "idle": {"streams": 10_000, "channels": 1000, "rate": 0.0},
}


def raise_fd_limit(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 2 * streams + 1000))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # the relay inherits it


async def main_async(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # keep the relay's CPU for the relay
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-relay-logs-"))
    with redis_server() as url:
        for name in names:
            if name == "custom":
                spec = {"streams": args.streams, "channels": args.channels, "rate": args.rate}
            else:
                spec = SCENARIOS[name]
            raise_fd_limit(int(spec["streams"]))
            result = await run(
                name,
                url,
                int(spec["streams"]),
                int(spec["channels"]),
                float(spec["rate"]),
                args.duration,
                {},
                log_dir,
                args.probes,
            )
            result.show()
    print(f"\n(relay logs in {log_dir})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all", "custom"])
    parser.add_argument("--streams", type=int, default=1000, help="custom: streams")
    parser.add_argument("--channels", type=int, default=10, help="custom: channels")
    parser.add_argument("--rate", type=float, default=100.0, help="custom: events/s in total")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of publishing")
    parser.add_argument(
        "--probes", type=int, default=100, help="streams that parse every frame (latency, order)"
    )
    args = parser.parse_args()
    if any(a.startswith("--streams") or a.startswith("--channels") for a in sys.argv[1:]):
        args.scenario = "custom" if args.scenario == "all" else args.scenario
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
