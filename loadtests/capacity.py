"""Capacity benchmark of one relay process: the scenarios S1 to S4 and IDLE, printed as one table.

    .tools/bin/uv run python loadtests/capacity.py                     # S1 S2 S3 S4 IDLE, relay
    .tools/bin/uv run python loadtests/capacity.py --target reference  # the same, client's ceiling
    .tools/bin/uv run python loadtests/capacity.py --scenario S3 --results loadtests/results/capacity

| scenario | streams | channels | events/s (total) | deliveries/s |
|---|---|---|---|---|
| S1 | 1,000 | 1,000 | 100 | 100 |
| S2 | 1,000 | 100 | 100 | 1,000 |
| S3 | 1,000 | 1 | 100 | 100,000 (broadcast) |
| S4 | 10,000 | 10,000 | 1,000 | 1,000 |
| IDLE | 10,000 | 10,000 | 0 | relay memory and CPU per idle stream |

Layout on the machine (2 cores): the server under test alone on CPU 1 (``taskset``); Redis, the
publisher and this client on CPU 0. Every target is a loopback address; every loop is bounded.

- **Client**: asyncio + uvloop, one raw ``asyncio.Protocol`` per stream speaking HTTP/1.1 by hand
  (no HTTP library). Each read is scanned with ``bytes.count``/``rfind`` (C speed) for ``id:`` lines;
  the ids carry each channel's sequence number, so every stream checks *every* event it gets (lost,
  duplicate) and records the latency of every delivery, not a sample.
- **Publisher**: a subprocess on CPU 0 (so a busy client cannot delay publishing) ``PUBLISH``es
  contract ``notification`` payloads at a steady rate, round-robin over the channels, and stamps
  each event's send time (``CLOCK_MONOTONIC``, shared by every process) in a shared ``mmap``;
  latency is publish → the client's read of the frame.
- **Targets**: ``relay`` is ``rapidphoto-relay`` (``--server-cmd`` runs another command for the same
  app, e.g. granian); ``reference`` is a bare asyncio + uvloop server in this file (``_reference``):
  one ``PSUBSCRIBE``, each payload framed once, pre-encoded chunks written straight to every socket.
  Run against ``reference``, the figures are the ceiling of this client and machine: a relay figure
  close to it is client-bound, not relay-bound.
- **Measured** per scenario: deliveries/s, lost, duplicates, p50/p99/max latency, the server's
  CPU-seconds (``/proc/<pid>/stat``) per 1,000 deliveries and its share of its core, its RSS per open
  stream (RSS with the streams open minus before, after a warm-up), this client's CPU share, what
  *other* processes used of the server's core (``/proc/stat`` minus the server: contention), and
  the load average. A run where this client used ≥ 85 % of its core, or other processes took
  ≥ 20 % of the server's core, is flagged: its latency says more about the machine than the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import mmap
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import uvloop

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages (deploy) importable
    sys.path.insert(0, str(ROOT))
BIN: Final = Path(sys.executable).parent
SECRET: Final = "capacity-secret-capacity-secret-0123456789"
STREAM_PATH: Final = "/api/upload/sessions/notifications/stream"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024
#: Flags: the client's own core this busy (or its loop lagging by half the p99 latency); other
#: processes this busy on the server's core while that core was full.
CLIENT_BOUND_SHARE: Final = 0.85
CONTENDED_SHARE: Final = 0.20
#: Streams opened and closed before the measurement (first-use allocations are not per stream).
WARM_STREAMS: Final = 200
PYSPY_MODE: list[str] = os.environ.get("CAPACITY_PYSPY", "--nonblocking").split()


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    channels: int
    rate: float  # events/s in total, round-robin over the channels; 0: idle streams
    p99_ms: float | None = None
    us_per_delivery: float | None = None
    kib_per_stream: float | None = None


SCENARIOS: Final = {
    s.name: s
    for s in (
        Scenario("S1", 1000, 1000, 100.0, p99_ms=5.0),
        Scenario("S2", 1000, 100, 100.0, p99_ms=5.0),
        Scenario("S3", 1000, 1, 100.0, p99_ms=100.0, us_per_delivery=11.0),
        Scenario("S4", 10_000, 10_000, 1000.0, p99_ms=10.0),
        Scenario("IDLE", 10_000, 10_000, 0.0, kib_per_stream=20.0),
    )
}


# --- /proc -----------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server may run its app in worker processes: granian)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_cpu(pid)
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_kib(member)
    return total


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy, total) seconds since boot, from ``/proc/stat``."""
    out: dict[int, tuple[float, float]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
        busy = user + nice + system + irq + softirq + steal
        out[int(name[3:])] = (busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK)
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_fd_limit(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 2 * streams + 2000))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # children inherit it


def user_of(channel: int) -> str:
    return f"cap{channel}"


# --- the client ------------------------------------------------------------------------------------


class Run:
    """What every stream of one run shares: send times, latencies, counters."""

    def __init__(self, channels: int, sent: memoryview[float]) -> None:
        self.channels = channels
        self.sent = sent  # sent[seq * channels + channel]: the publisher's CLOCK_MONOTONIC stamp
        self.latencies = array("d")
        self.delivered = 0
        self.lost = 0
        self.duplicates = 0
        self.closed_early = 0
        self.last_arrival = 0.0


class Stream(asyncio.Protocol):
    """One SSE stream: request, status, ``retry:``, then counting and timing every ``id:`` frame.

    Frames carry ``id: 1-<seq>``, ``seq`` counting the events of the stream's channel from 0. A read
    holding n complete frames whose last id is L holds L-n+1 … L when nothing is lost or repeated
    (frames of a channel arrive in order), so one ``count`` and one ``rfind`` check a whole read.
    """

    __slots__ = ("channel", "closed", "expected", "head", "opened", "request", "run", "tail")

    def __init__(self, run: Run, channel: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.run = run
        self.channel = channel
        self.request = request
        self.opened: asyncio.Future[int] = loop.create_future()
        self.closed = False
        self.head = True
        self.tail = b""
        self.expected = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        if not self.opened.done():
            if self.head:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.tail = buf
                    return
                status = int(buf.split(b" ", 2)[1])
                if status != 200:
                    self.opened.set_result(status)
                    self.tail = b""
                    return
                self.head = False
                buf = buf[end + 4 :]
            if b"retry:" not in buf:
                self.tail = buf
                return
            self.opened.set_result(200)
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        self.tail = buf[end + 2 :]
        count = buf.count(b"id: ", 0, end)
        if not count:
            return  # heartbeats, the retry frame
        now = time.monotonic()
        start = buf.rfind(b"id: ", 0, end)
        dash = buf.index(b"-", start)
        last = int(buf[dash + 1 : buf.index(b"\n", dash)])
        first = last - count + 1
        run = self.run
        if first > self.expected:
            run.lost += first - self.expected
        elif first < self.expected:
            run.duplicates += self.expected - first
            first = self.expected
        self.expected = last + 1
        sent, channels, channel = run.sent, run.channels, self.channel
        latencies = run.latencies
        for seq in range(first, last + 1):
            latencies.append(now - sent[seq * channels + channel])
        run.delivered += last + 1 - first
        run.last_arrival = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(0)


async def open_streams(
    port: int, run: Run, streams: int, channels: int, batch: int = 500
) -> list[tuple[Stream, asyncio.Transport]]:
    """``streams`` streams, stream n on channel n % channels (one user per channel)."""
    from rapidphoto_contract.tokens import mint_token

    loop = asyncio.get_running_loop()
    requests = [
        (
            f"GET {STREAM_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: text/event-stream\r\nAuthorization: Bearer "
            f"{mint_token(user_of(c), key=SECRET, ttl_seconds=7200)}\r\n\r\n"
        ).encode()
        for c in range(min(channels, streams))
    ]
    opened: list[tuple[Stream, asyncio.Transport]] = []
    for start in range(0, streams, batch):
        made: list[tuple[Stream, asyncio.Transport]] = []
        for n in range(start, min(streams, start + batch)):
            stream = Stream(run, n % channels, requests[n % channels])
            transport, _ = await loop.create_connection(lambda s=stream: s, "127.0.0.1", port)  # type: ignore[misc]
            made.append((stream, transport))
        statuses = await asyncio.wait_for(asyncio.gather(*(s.opened for s, _ in made)), 120)
        refused = [s for s in statuses if s != 200]
        opened += made
        if refused:
            raise RuntimeError(
                f"{len(refused)} of {len(made)} streams refused after {start} opened, "
                f"e.g. status {refused[0]}"
            )
    return opened


# --- the publisher (a subprocess: ``capacity.py _publish ...``) -----------------------------------


def publisher_main(argv: Sequence[str]) -> None:
    import redis

    from rapidphoto_contract.events import Notification
    from rapidphoto_contract.keys import notification_channel

    parser = argparse.ArgumentParser(prog="capacity.py _publish")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--sent", type=Path, required=True, help="mmap'ed file of send times")
    args = parser.parse_args(argv)
    channels = args.channels
    names = [notification_channel(user_of(c)) for c in range(channels)]
    with args.sent.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 0)
    sent = memoryview(mapped).cast("d")
    capacity = len(sent)
    client = redis.Redis.from_url(args.redis_url)
    tick = max(1.0 / args.rate, 0.001)
    owed, published, late_ticks = 0.0, 0, 0
    start = time.monotonic()
    next_tick = start
    while time.monotonic() - start < args.duration and published < capacity:
        owed += args.rate * tick
        count = min(int(owed), capacity - published)
        owed -= count
        if count:
            stamp = dt.datetime.now(dt.UTC)
            occurred = f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"
            pipe = client.pipeline(transaction=False)
            for g in range(published, published + count):
                channel = g % channels
                payload = Notification(
                    event_id=f"1-{g // channels}",
                    occurred_at=occurred,
                    kind="CAPACITY",
                    user_id=user_of(channel),
                    session_id="capacity",
                    total_photos=1,
                    uploaded_photos=1,
                    failed_photos=0,
                ).to_json()
                pipe.publish(names[channel], payload)
            now = time.monotonic()
            for g in range(published, published + count):
                sent[g] = now
            pipe.execute()
            published += count
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late_ticks += 1
    elapsed = time.monotonic() - start
    client.close()
    sent.release()
    mapped.close()
    report = {
        "published": published,
        "started": start,
        "seconds": elapsed,
        "late_ticks": late_ticks,
    }
    print(json.dumps(report))


# --- the reference server (``capacity.py _reference --port P --redis-url U``) ---------------------


def reference_main(argv: Sequence[str]) -> None:
    """A bare relay: one PSUBSCRIBE, frame once, write pre-encoded chunks straight to sockets.

    No auth check (the token's ``sub`` is read, not verified), no buffers, no limits: the floor a
    Python relay on asyncio + uvloop can reach, and the ceiling this client can measure.
    """
    import hiredis
    import msgspec

    from rapidphoto_contract.keys import NOTIFICATION_CHANNEL_PREFIX
    from rapidphoto_relay import sse

    parser = argparse.ArgumentParser(prog="capacity.py _reference")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    redis_host, redis_port = args.redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    channels: dict[bytes, set[asyncio.Transport]] = {}
    decoder = msgspec.json.Decoder()
    ready = False
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    def chunk(body: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(body), body)

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.channel: bytes | None = None
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            if self.channel is not None:
                return
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            request = self.buf.split(b"\r\n")
            if b"/health" in request[0]:
                status = b"200 OK" if ready else b"503 Service Unavailable"
                self.transport.write(b"HTTP/1.1 %b\r\ncontent-length: 0\r\n\r\n" % status)
                self.transport.close()
                return
            token = next(
                line.split(b" ")[-1]
                for line in request
                if line.lower().startswith(b"authorization:")
            )
            claims = token.split(b".")[1]
            sub = json.loads(base64.urlsafe_b64decode(claims + b"=" * (-len(claims) % 4)))["sub"]
            self.channel = (NOTIFICATION_CHANNEL_PREFIX + sub).encode()
            channels.setdefault(self.channel, set()).add(self.transport)
            self.transport.write(head + chunk(sse.retry(2000)))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.channel is not None and self.transport is not None:
                channels.get(self.channel, set()).discard(self.transport)

    class PubSub(asyncio.Protocol):
        def __init__(self) -> None:
            self.reader = hiredis.Reader()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            pattern = (NOTIFICATION_CHANNEL_PREFIX + "*").encode()
            transport.write(  # type: ignore[attr-defined]
                b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%b\r\n" % (len(pattern), pattern)
            )

        def data_received(self, data: bytes) -> None:
            nonlocal ready
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if reply[0] == b"pmessage":
                    targets = channels.get(reply[2])
                    if targets:
                        obj = decoder.decode(reply[3])
                        frame = chunk(
                            sse.event(reply[3], event_type=obj["type"], event_id=obj["eventId"])
                        )
                        for transport in targets:
                            transport.write(frame)
                elif reply[0] == b"psubscribe":
                    ready = True

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(PubSub, redis_host, int(redis_port))
        server = await loop.create_server(Client, "127.0.0.1", args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve())


# --- a run -----------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    target: str
    streams: int
    channels: int
    rate: float
    connected: int = 0
    connect_s: float = 0.0
    connect_cpu_ms_per_stream: float = 0.0
    published: int = 0
    publish_s: float = 0.0
    publisher_late_ticks: int = 0
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    closed_early: int = 0
    deliveries_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_s: float = 0.0
    server_cpu_share: float = 0.0
    us_per_delivery: float = 0.0
    rss_before_kib: int = 0
    rss_open_kib: int = 0
    kib_per_stream: float = 0.0
    proxy_kib_per_stream: float | None = None
    idle_cpu_s_per_min: float = 0.0
    client_cpu_share: float = 0.0
    client_lag_p99_ms: float = 0.0
    client_lag_max_ms: float = 0.0
    others_on_server_cpu: float = 0.0
    others_on_client_cpu: float = 0.0
    seconds: float = 0.0
    load_before: str = ""
    load_after: str = ""
    flags: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)

    def judge(self, scenario: Scenario) -> None:
        checks: list[tuple[str, bool]] = []
        if scenario.rate > 0:
            checks.append(("0 lost", self.lost == 0 and self.delivered == self.expected))
            checks.append(("0 dup", self.duplicates == 0))
        if scenario.name == "S3":
            checks.append(("≥99k/s", self.deliveries_per_s >= 99_000))
        if scenario.streams >= 10_000:
            checks.append((f"{scenario.streams:,} open", self.connected == scenario.streams))
        if scenario.p99_ms is not None:
            checks.append((f"p99<{scenario.p99_ms:g}ms", self.p99_ms < scenario.p99_ms))
        if scenario.us_per_delivery is not None:
            checks.append(
                (
                    f"≤{scenario.us_per_delivery:g}µs",
                    self.us_per_delivery <= scenario.us_per_delivery,
                )
            )
        if scenario.kib_per_stream is not None:
            checks.append(
                (f"≤{scenario.kib_per_stream:g}KiB", self.kib_per_stream <= scenario.kib_per_stream)
            )
        self.verdict = [("PASS " if ok else "FAIL ") + name for name, ok in checks]


class Server:
    """The process under test, pinned to CPU 1."""

    def __init__(
        self, target: str, redis_url: str, scenario: Scenario, logs: Path, server_cmd: str | None
    ) -> None:
        self.port = free_port()
        self.target = target
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "RELAY_", "SSE_"))},
            "REDIS_URL": redis_url,
            "JWT_SECRET": SECRET,
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(self.port),
            "RELAY_MAX_CONNECTIONS": str(max(10_000, scenario.streams)),
            "RELAY_MAX_CONNECTIONS_PER_USER": str(
                max(32, -(-scenario.streams // scenario.channels))
            ),
        }
        if target == "reference":
            argv = [sys.executable, __file__, "_reference", "--port", str(self.port)]
            argv += ["--redis-url", redis_url]
        elif server_cmd:
            argv = [part.replace("{port}", str(self.port)) for part in shlex.split(server_cmd)]
        else:
            argv = [str(BIN / "rapidphoto-relay"), "--port", str(self.port)]
        self.log_path = logs / f"{target}-{scenario.name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*pinned(1), *argv], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up, see {self.log_path}")
            with contextlib.suppress(OSError, TimeoutError):
                if b" 200 " in (await self.get("/health/ready"))[:20]:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server not ready after 30 s, see {self.log_path}")

    async def wait_streams_closed(self) -> None:
        """Relay only: until ``/metrics`` shows no open stream (warm-up streams released)."""
        if self.target == "reference":
            await asyncio.sleep(1.0)
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = (await self.get("/metrics")).decode(errors="replace")
            open_now = sum(
                float(line.rsplit(" ", 1)[1])
                for line in body.splitlines()
                if line.startswith("rapidphoto_relay_open_streams{")
            )
            if open_now == 0:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("warm-up streams still open after 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Nginx:
    """The deployed nginx template (``deploy/nginx``) in front of the server, on CPU 0: what a
    stream costs the proxy too (``--via-nginx``)."""

    def __init__(self, folder: Path, upstream_port: int) -> None:
        from deploy.render_nginx import NginxLayout, write_config

        self.port = free_port()
        layout = NginxLayout.local(
            folder, f"127.0.0.1:{self.port}", [f"127.0.0.1:{upstream_port}"], worker_processes="2"
        )
        conf = write_config(folder, layout)
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise SystemExit("--via-nginx: nginx is not installed (deploy/ensure-nginx)")
        argv = [binary, "-p", str(folder), "-c", str(conf), "-e", layout.error_log]
        self.proc = subprocess.Popen(
            [*pinned(0), *argv, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self) -> None:
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()


async def watch_loop_lag(lags: array[float], interval: float = 0.005) -> None:
    """How late this client's event loop runs a timer: when it lags, so do its reads (and the
    latency it reports) — the client's own share of every latency figure."""
    while True:
        due = time.monotonic() + interval
        await asyncio.sleep(interval)
        # uvloop's timers have a resolution of 1 ms: up to that is not lag
        lags.append(max(0.0, time.monotonic() - due - 0.001))


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run_scenario(
    scenario: Scenario,
    target: str,
    redis_url: str,
    duration: float,
    idle_seconds: float,
    logs: Path,
    server_cmd: str | None,
    profile: Path | None = None,
    via_nginx: bool = False,
) -> Result:
    result = Result(scenario.name, target, scenario.streams, scenario.channels, scenario.rate)
    result.load_before = loadavg()
    raise_fd_limit(scenario.streams)
    capacity = max(1, int(scenario.rate * duration * 1.2) + scenario.channels)
    sent_file = logs / f"sent-{scenario.name}.bin"
    sent_file.write_bytes(b"\0" * 8 * capacity)
    with sent_file.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 0)
    sent = memoryview(mapped).cast("d")
    server = Server(target, redis_url, scenario, logs, server_cmd)
    spy: asyncio.subprocess.Process | None = None
    proxy: Nginx | None = None
    opened: list[tuple[Stream, asyncio.Transport]] = []
    try:
        await server.wait_ready()
        port = server.port
        if via_nginx:
            proxy = Nginx(logs / f"nginx-{target}-{scenario.name}", server.port)
            await proxy.wait_ready()
            port = proxy.port
        warm = await open_streams(port, Run(WARM_STREAMS, sent), WARM_STREAMS, WARM_STREAMS)
        for _, transport in warm:
            transport.close()
        await server.wait_streams_closed()
        await asyncio.sleep(1.0)
        result.rss_before_kib = tree_rss_kib(server.pid)
        proxy_before = 0 if proxy is None else tree_rss_kib(proxy.pid)
        run = Run(scenario.channels, sent)
        started = time.monotonic()
        connect_cpu0 = tree_cpu(process_tree(server.pid))
        try:
            opened = await open_streams(port, run, scenario.streams, scenario.channels)
        finally:
            result.connected = sum(1 for s, _ in opened if s.opened.done() and not s.closed)
        result.connect_s = time.monotonic() - started
        connect_cpu = tree_cpu(process_tree(server.pid)) - connect_cpu0
        result.connect_cpu_ms_per_stream = connect_cpu / max(1, result.connected) * 1000
        await asyncio.sleep(2.0)  # let the server settle (first writes, allocations)
        result.rss_open_kib = tree_rss_kib(server.pid)
        result.kib_per_stream = (result.rss_open_kib - result.rss_before_kib) / scenario.streams
        if proxy is not None:
            proxy_after = tree_rss_kib(proxy.pid)
            result.proxy_kib_per_stream = (proxy_after - proxy_before) / scenario.streams
        spy = await start_profiler(profile, scenario, target, server.pid)
        lags = array("d")
        lag_watch = asyncio.create_task(watch_loop_lag(lags))
        server_pids = process_tree(server.pid)
        server_cpu0, client_cpu0, cpus0 = tree_cpu(server_pids), proc_cpu(os.getpid()), cpu_times()
        started = time.monotonic()
        if scenario.rate > 0:
            publisher = await asyncio.create_subprocess_exec(
                *pinned(0),
                sys.executable,
                __file__,
                "_publish",
                "--redis-url",
                redis_url,
                "--channels",
                str(scenario.channels),
                "--rate",
                str(scenario.rate),
                "--duration",
                str(duration),
                "--sent",
                str(sent_file),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(publisher.communicate(), duration + 60)
            report = json.loads(out.decode().strip().splitlines()[-1])
            result.published = report["published"]
            result.publish_s = report["seconds"]
            publish_started = report["started"]
            result.publisher_late_ticks = report["late_ticks"]
            per_channel = [
                len(range(c, result.published, scenario.channels)) for c in range(scenario.channels)
            ]
            result.expected = sum(per_channel[s.channel] for s, _ in opened)
            # drain: until everything arrived, or nothing moved for 3 s (bounded either way)
            last, quiet_since = -1, time.monotonic()
            while run.delivered + run.lost < result.expected:
                await asyncio.sleep(0.05)
                if run.delivered != last:
                    last, quiet_since = run.delivered, time.monotonic()
                elif time.monotonic() - quiet_since > 3.0:
                    break
            for stream, _ in opened:  # what never arrived at the end of each stream
                run.lost += max(0, per_channel[stream.channel] - stream.expected)
        else:
            await asyncio.sleep(idle_seconds)
        result.seconds = time.monotonic() - started
        lag_watch.cancel()
        ordered_lags = sorted(lags)
        result.client_lag_p99_ms = percentile(ordered_lags, 0.99) * 1000
        result.client_lag_max_ms = (ordered_lags[-1] if ordered_lags else 0.0) * 1000
        cpus1 = cpu_times()
        result.server_cpu_s = tree_cpu(server_pids) - server_cpu0
        client_cpu = proc_cpu(os.getpid()) - client_cpu0
        result.server_cpu_share = result.server_cpu_s / result.seconds
        result.client_cpu_share = client_cpu / result.seconds
        if 1 in cpus0:
            busy = cpus1[1][0] - cpus0[1][0]
            result.others_on_server_cpu = max(0.0, busy - result.server_cpu_s) / result.seconds
            busy0 = cpus1[0][0] - cpus0[0][0]
            result.others_on_client_cpu = max(0.0, busy0 - client_cpu) / result.seconds
        result.closed_early = sum(1 for s, _ in opened if s.closed)
        result.delivered, result.lost, result.duplicates = run.delivered, run.lost, run.duplicates
        if scenario.rate > 0 and run.last_arrival:
            window = max(result.publish_s, run.last_arrival - publish_started)
            result.deliveries_per_s = run.delivered / window
            result.us_per_delivery = result.server_cpu_s / max(1, run.delivered) * 1e6
            ordered = sorted(run.latencies)
            result.p50_ms = percentile(ordered, 0.50) * 1000
            result.p99_ms = percentile(ordered, 0.99) * 1000
            result.max_ms = ordered[-1] * 1000
        else:
            result.idle_cpu_s_per_min = result.server_cpu_s / result.seconds * 60
        lagging = result.client_lag_p99_ms >= max(1.0, 0.5 * result.p99_ms)
        if result.client_cpu_share >= CLIENT_BOUND_SHARE or (scenario.rate > 0 and lagging):
            result.flags.append("client-bound")
        full = result.server_cpu_share + result.others_on_server_cpu >= 0.9
        if result.others_on_server_cpu >= CONTENDED_SHARE and full:
            result.flags.append("contended")
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), 60)
        for _, transport in opened:
            transport.close()
        if proxy is not None:
            proxy.stop()
        server.stop()
        sent.release()
        mapped.close()
        sent_file.unlink(missing_ok=True)
    result.load_after = loadavg()
    result.judge(scenario)
    return result


async def start_profiler(
    folder: Path | None, scenario: Scenario, target: str, pid: int
) -> asyncio.subprocess.Process | None:
    """py-spy on the server for the measurement (collapsed stacks; ``--nonblocking``: the server
    is sampled without being paused, so the profile costs it nothing but a little accuracy)."""
    if folder is None:
        return None
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    out = folder / f"{target}-{scenario.name}.txt"
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200", "--format", "raw"]
    argv += PYSPY_MODE
    return await asyncio.create_subprocess_exec(
        *pinned(0), *argv, "-o", str(out), stdout=asyncio.subprocess.DEVNULL
    )


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="capacity-redis-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", folder, "--loglevel", "warning"]
    proc = subprocess.Popen([*pinned(0), *argv], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------------

HEADER: Final = (
    "| scenario | target | streams / channels | events/s | deliveries/s | lost | dup "
    "| p50 / p99 / max ms | server CPU | µs CPU per delivery (CPU-s per 1,000) | RSS KiB per stream "
    "| client CPU (+ others on its core) | client loop lag p99 / max ms | others on server core | load before → after | checks |"
)


def row(r: Result) -> str:
    if r.rate > 0:
        deliveries = f"{r.deliveries_per_s:,.0f}"
        latency = f"{r.p50_ms:.1f} / {r.p99_ms:.1f} / {r.max_ms:.0f}"
        per = f"{r.us_per_delivery:.2f} ({r.us_per_delivery / 1000:.4f})"
        lost, dup = f"{r.lost:,}", f"{r.duplicates:,}"
        events = f"{r.published / r.publish_s:,.0f}" if r.publish_s else "0"
    else:
        deliveries, latency, lost, dup, events = "—", "—", "—", "—", "0"
        per = (
            f"idle: {r.idle_cpu_s_per_min:.2f} CPU-s/min; opening: "
            f"{r.connect_cpu_ms_per_stream:.2f} ms per stream"
        )
    flags = f" ({', '.join(r.flags)})" if r.flags else ""
    rss = f"{r.kib_per_stream:.1f}"
    if r.proxy_kib_per_stream is not None:
        rss += f" (+nginx {r.proxy_kib_per_stream:.1f})"
    return (
        f"| {r.scenario} | {r.target} | {r.connected:,} / {r.channels:,} | {events} | {deliveries} "
        f"| {lost} | {dup} | {latency} | {r.server_cpu_share:.0%} | {per} | {rss} "
        f"| {r.client_cpu_share:.0%} (+{r.others_on_client_cpu:.0%}){flags} "
        f"| {r.client_lag_p99_ms:.1f} / {r.client_lag_max_ms:.0f} "
        f"| {r.others_on_server_cpu:.0%} "
        f"| {r.load_before.split()[0]} → {r.load_after.split()[0]} | {', '.join(r.verdict)} |"
    )


def table(results: Sequence[Result]) -> str:
    separator = "|" + "---|" * HEADER.count(" | ") + "---|"
    return "\n".join([HEADER, separator, *(row(r) for r in results)])


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{os.cpu_count()} CPU(s) ({model}), {mem_kib / 1024**2:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "services/relay"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (relay has uncommitted changes)" if dirty else "")


def write_results(folder: Path, results: Sequence[Result], command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"# Relay capacity ({', '.join(dict.fromkeys(r.scenario for r in results))})",
            "",
            f"Command: `{command}`",
            "",
            f"Code: {git_revision()}; run {stamp}.",
            "",
            f"Machine: {machine()}. Server under test pinned to CPU 1; Redis, publisher and "
            "client on CPU 0. Load average (1, 5, 15 min) before and after each scenario in the "
            "table and in `results.json`.",
            "",
            table(results),
            "",
            "Columns: *server CPU* is the server's share of its core over the measurement; *client "
            "CPU* this client's share of its core, and what other processes used of it; *client "
            "loop lag* how late the client's event loop ran a 5 ms timer (its own share of any "
            "latency); flagged client-bound from "
            f"{CLIENT_BOUND_SHARE:.0%} CPU or a loop lag p99 of half the latency p99; *others on "
            "server core* what other processes used of the server's core meanwhile (flagged "
            f"contended from {CONTENDED_SHARE:.0%} when that core was ≥ 90 % busy). Latency is "
            "publish → read by the client, over every delivery.",
            "",
        ]
    )
    (folder / "summary.md").write_text(text)
    payload = {"command": command, "machine": machine(), "results": [asdict(r) for r in results]}
    (folder / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


async def main_async(args: argparse.Namespace) -> list[Result]:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # the server's core is the server's
    logs = Path(tempfile.mkdtemp(prefix="capacity-"))
    names = list(SCENARIOS) if args.scenario == ["all"] else args.scenario
    results: list[Result] = []
    with redis_server() as redis_url:
        for name in names:
            scenario = SCENARIOS[name]
            if args.streams or args.channels or args.rate is not None:
                scenario = Scenario(
                    name,
                    args.streams or scenario.streams,
                    args.channels or scenario.channels,
                    scenario.rate if args.rate is None else args.rate,
                    scenario.p99_ms,
                    scenario.us_per_delivery,
                    scenario.kib_per_stream,
                )
            for target in args.target:
                print(f"-- {name} on {target} (load {loadavg()})", flush=True)
                result = await run_scenario(
                    scenario,
                    target,
                    redis_url,
                    args.duration,
                    args.idle,
                    logs,
                    args.server_cmd,
                    args.profile,
                    args.via_nginx,
                )
                if target == "relay" and args.label:
                    result.target = args.label
                results.append(result)
                print(table([result]).splitlines()[-1], flush=True)
    print(f"\n(server logs in {logs})\n")
    return results


def set_priority(nice: int) -> None:
    """Niceness for this process and its children (Redis, the server, the publisher).

    With the kernel's autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) niceness only
    weighs inside a session's group, so the benchmark also takes a session of its own and gives
    that group the same niceness: other jobs on a shared machine then take less of its cores.
    """
    with contextlib.suppress(OSError):
        os.setsid()  # fails when already a session or group leader: the current group is used
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(f"{nice}\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        publisher_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":
        reference_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", nargs="+", default=["all"], choices=[*SCENARIOS, "all"], metavar="NAME"
    )
    parser.add_argument(
        "--target", nargs="+", default=["relay"], choices=["relay", "reference"], metavar="TARGET"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds IDLE streams are held")
    parser.add_argument("--streams", type=int, help="override the scenario's streams")
    parser.add_argument("--channels", type=int, help="override the scenario's channels")
    parser.add_argument("--rate", type=float, help="override the scenario's events/s")
    parser.add_argument(
        "--server-cmd", help="run this instead of rapidphoto-relay ({port} is replaced)"
    )
    parser.add_argument("--label", help="name of the relay target in the table (e.g. baseline)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of every benchmark process (negative needs root): a shared machine's other "
        "jobs then take less of the server's and the client's cores",
    )
    parser.add_argument(
        "--via-nginx",
        action="store_true",
        help="clients connect through the deployed nginx config (its RSS per stream is reported)",
    )
    parser.add_argument("--results", type=Path, help="write summary.md and results.json here")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the server during each measurement, stacks to here"
    )
    args = parser.parse_args()
    if not 1 <= args.duration <= 600 or not 1 <= args.idle <= 600:
        parser.error("--duration and --idle are 1..600 s")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.nice:
        set_priority(args.nice)
    results = uvloop.run(main_async(args))
    print(table(results))
    if args.results:
        command = ".tools/bin/uv run python loadtests/capacity.py " + shlex.join(sys.argv[1:])
        write_results(args.results, results, command)
        print(f"\nwritten to {args.results}/summary.md")


if __name__ == "__main__":
    main()
