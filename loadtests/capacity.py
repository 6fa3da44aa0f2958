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
| STORM, STORM-SESSION, STORM-RESUME | 1,000 + 10,000 opened at once | 1,000 | 100 | 100 |
| MULTI8 | 1,000 multi-session streams of 8 sessions | 8,000 sessions | 100 | 100 |
| SINGLE8 | 8,000 session streams, the same sessions | 8,000 sessions | 100 | 100 |

``all`` is S1 to S4 and IDLE; the storms (``bench/storm.py``) are named: 10,000 streams (fresh
notification streams, fresh session streams with their snapshot, session streams resuming with
``Last-Event-ID``) opened as fast as the client can while 1,000 bystanders receive 100 events/s.
MULTI8 and SINGLE8 (``bench/sessions.py``, named too) compare the multi-session stream with single
session streams over the same seeded sessions and events.

Layout on the machine (2 cores): the server under test alone on CPU 1 (``taskset``); Redis, the
publisher and this client on CPU 0. Every target is a loopback address; every loop is bounded.
The pieces are in ``loadtests/bench/``; this file is the run and its command line.

- **Client** (``bench/client.py``): asyncio + uvloop, a raw ``asyncio.Protocol`` per stream; every
  stream checks every event it gets (lost, duplicate) and times every delivery, not a sample.
- **Publisher** (``bench/notify_publisher.py``): a subprocess on CPU 0 publishing contract
  ``notification`` payloads at a steady rate, round-robin over the channels, its send times in a
  shared ``mmap``: latency is publish → the client's read of the frame.
- **Targets** (``bench/targets.py``): ``relay`` is ``rapidphoto-relay`` (``--server-cmd`` runs
  another command for the same app, e.g. granian); ``reference`` (``bench/reference.py``) is a bare
  asyncio + uvloop server, the ceiling of this client and machine: a relay figure close to it is
  client-bound, not relay-bound.
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
import contextlib
import mmap
import os
import shlex
import signal
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import uvloop

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages importable
    sys.path.insert(0, str(ROOT))

from loadtests.bench import nchan, procfs, sessions  # noqa: E402
from loadtests.bench.client import (  # noqa: E402
    EVENT_ID,
    Run,
    Stream,
    drain,
    open_streams,
    watch_loop_lag,
)
from loadtests.bench.notify_publisher import publish  # noqa: E402
from loadtests.bench.report import Result, flags, percentile, table, write_results  # noqa: E402
from loadtests.bench.storm import (  # noqa: E402
    STORMS,
    StormStream,
    open_storm,
    seed_sessions,
    storm_requests,
)
from loadtests.bench.targets import Nginx, Server, start_profiler  # noqa: E402
from tests.support.redis_server import private_redis  # noqa: E402

#: Streams opened and closed before the measurement (first-use allocations are not per stream).
WARM_STREAMS: Final = 200
#: The storms' goals: relay CPU per stream opened, and the time for 10,000 of them.
STORM_US_PER_OPEN: Final = 100.0
STORM_SECONDS: Final = 1.5
#: Seconds of bystander load measured before a storm (the CPU it costs is not the storm's).
STORM_BASELINE_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    channels: int
    rate: float  # events/s in total, round-robin over the channels; 0: idle streams
    p99_ms: float | None = None
    us_per_delivery: float | None = None
    kib_per_stream: float | None = None
    storm: int = 0  # streams opened at once while the scenario's streams receive events
    #: "notifications": one user per channel; "single"/"multi": seeded sessions, ``channels`` of
    #: them, one session stream each or one multi-session stream per 8 (``bench/sessions.py``).
    kind: str = "notifications"


SCENARIOS: Final = {
    s.name: s
    for s in (
        Scenario("S1", 1000, 1000, 100.0, p99_ms=5.0),
        Scenario("S2", 1000, 100, 100.0, p99_ms=5.0),
        Scenario("S3", 1000, 1, 100.0, p99_ms=100.0, us_per_delivery=11.0),
        Scenario("S4", 10_000, 10_000, 1000.0, p99_ms=10.0),
        Scenario("IDLE", 10_000, 10_000, 0.0, kib_per_stream=20.0),
        # Storms: 10,000 opens while 1,000 bystanders get 100 events/s (bench/storm.py).
        Scenario("STORM", 1000, 1000, 100.0, p99_ms=50.0, storm=10_000),
        Scenario("STORM-SESSION", 1000, 1000, 100.0, p99_ms=50.0, storm=10_000),
        Scenario("STORM-RESUME", 1000, 1000, 100.0, p99_ms=50.0, storm=10_000),
        # The same 8,000 sessions and events: 1,000 multi-session streams of 8, or 8,000 single
        # session streams (bench/sessions.py); MULTI8 must not cost more per delivery.
        Scenario("MULTI8", 1000, 8000, 100.0, p99_ms=5.0, kind="multi"),
        Scenario("SINGLE8", 8000, 8000, 100.0, p99_ms=5.0, kind="single"),
    )
}


def judge(result: Result, scenario: Scenario) -> list[str]:
    """The scenario's checks on ``result``, each ``PASS <check>`` or ``FAIL <check>``."""
    checks: list[tuple[str, bool]] = []
    if scenario.rate > 0:
        checks.append(("0 lost", result.lost == 0 and result.delivered == result.expected))
        checks.append(("0 dup", result.duplicates == 0))
    if scenario.name == "S3":
        checks.append(("≥99k/s", result.deliveries_per_s >= 99_000))
    if scenario.storm:
        checks.append((f"{scenario.storm:,} opened", result.storm_streams == scenario.storm))
        checks.append(("≤100µs/open", 0 < result.storm_cpu_us_per_open <= STORM_US_PER_OPEN))
        checks.append((f"open≤{STORM_SECONDS:g}s", result.storm_open_s <= STORM_SECONDS))
    if scenario.streams >= 10_000:
        checks.append((f"{scenario.streams:,} open", result.connected == scenario.streams))
    if scenario.p99_ms is not None:
        checks.append((f"p99<{scenario.p99_ms:g}ms", result.p99_ms < scenario.p99_ms))
    if scenario.us_per_delivery is not None:
        ok = result.us_per_delivery <= scenario.us_per_delivery
        checks.append((f"≤{scenario.us_per_delivery:g}µs", ok))
    if scenario.kib_per_stream is not None:
        ok = result.kib_per_stream <= scenario.kib_per_stream
        checks.append((f"≤{scenario.kib_per_stream:g}KiB", ok))
    return [("PASS " if ok else "FAIL ") + name for name, ok in checks]


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
    workers: int = 1,
) -> Result:
    result = Result(scenario.name, target, scenario.streams, scenario.channels, scenario.rate)
    on_sessions = scenario.kind != "notifications"
    if on_sessions:
        result.sessions = scenario.channels
        await sessions.ensure_seeded(redis_url, scenario.channels)
    result.load_before = procfs.loadavg()
    procfs.raise_fd_limit(scenario.streams + scenario.storm)
    capacity = max(1, int(scenario.rate * duration * 1.2) + scenario.channels)
    sent_file = logs / f"sent-{scenario.name}.bin"
    sent_file.write_bytes(b"\0" * 8 * capacity)
    with sent_file.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 0)
    sent = memoryview(mapped).cast("d")
    server = Server(
        target,
        redis_url,
        scenario.name,
        scenario.streams + scenario.storm,
        scenario.channels,
        logs,
        server_cmd,
        workers if target == "relay" else 1,
    )
    spy: asyncio.subprocess.Process | None = None
    proxy: Nginx | None = None
    opened: list[tuple[Stream, asyncio.Transport]] = []
    stormed: list[tuple[StormStream, asyncio.Transport]] = []
    try:
        await server.wait_ready()
        port = server.port
        if via_nginx:
            proxy = Nginx(logs / f"nginx-{target}-{scenario.name}", server.port)
            await proxy.wait_ready()
            port = proxy.port
        user_header = nchan.USER_HEADER if target == "nchan" else ""
        nchan_port = port if target == "nchan" else None
        open_mark = b"" if target == "nchan" else b"retry:"
        warm = await open_streams(
            port, Run(WARM_STREAMS, sent, open_mark), WARM_STREAMS, WARM_STREAMS, 500, user_header
        )
        for _, transport in warm:
            transport.close()
        await server.wait_streams_closed()
        await asyncio.sleep(1.0)
        result.rss_before_kib = procfs.tree_rss_kib(server.pid)
        proxy_before = 0 if proxy is None else procfs.tree_rss_kib(proxy.pid)
        run = Run(scenario.channels, sent, open_mark, sessions.MARKER if on_sessions else EVENT_ID)
        started = time.monotonic()
        connect_cpu0 = procfs.tree_cpu(procfs.process_tree(server.pid))
        try:
            if on_sessions:
                opened = await sessions.open_session_streams(
                    scenario.kind, port, run, scenario.streams, scenario.channels
                )
            else:
                opened = await open_streams(
                    port, run, scenario.streams, scenario.channels, 500, user_header
                )
        finally:
            result.connected = sum(1 for s, _ in opened if s.opened.done() and not s.closed)
        result.connect_s = time.monotonic() - started
        connect_cpu = procfs.tree_cpu(procfs.process_tree(server.pid)) - connect_cpu0
        result.connect_cpu_ms_per_stream = connect_cpu / max(1, result.connected) * 1000
        await asyncio.sleep(2.0)  # let the server settle (first writes, allocations)
        result.rss_open_kib = procfs.tree_rss_kib(server.pid)
        result.kib_per_stream = (result.rss_open_kib - result.rss_before_kib) / scenario.streams
        if proxy is not None:
            proxy_after = procfs.tree_rss_kib(proxy.pid)
            result.proxy_kib_per_stream = (proxy_after - proxy_before) / scenario.streams
        if on_sessions:  # what the open streams cost doing nothing: the rest is the deliveries'
            result.idle_cpu_share = await sessions.idle_cpu_share(server.pid, 3.0)
        spy = await start_profiler(profile, scenario.name, target, server.pid)
        lags = array("d")
        lag_watch = asyncio.create_task(watch_loop_lag(lags))
        server_lag0 = await server.loop_lag_buckets()
        cpu = procfs.CpuMeter(procfs.process_tree(server.pid))
        started = time.monotonic()
        if scenario.rate > 0:
            if scenario.storm:
                report = await storm(
                    scenario, port, redis_url, duration, sent_file, run, server, result, stormed
                )
            else:
                report = await publish(
                    redis_url,
                    scenario.channels,
                    scenario.rate,
                    duration,
                    sent_file,
                    nchan_port,
                    sessions=on_sessions,
                )
            result.published = report["published"]
            result.publish_s = report["seconds"]
            publish_started = report["started"]
            result.publisher_late_ticks = report["late_ticks"]
            result.expected = await drain(run, opened, result.published)
        else:
            await asyncio.sleep(idle_seconds)
        result.seconds = time.monotonic() - started
        storm_window = run.storm_latencies
        server_lag1 = await server.loop_lag_buckets()
        if server_lag0 and server_lag1 and result.server_loop_lag_p99_ms is None:
            lag = lag_quantiles(server_lag0, server_lag1)
            result.server_loop_lag_p99_ms, result.server_loop_lag_max_ms = lag
        lag_watch.cancel()
        ordered_lags = sorted(lags)
        result.client_lag_p99_ms = percentile(ordered_lags, 0.99) * 1000
        result.client_lag_max_ms = (ordered_lags[-1] if ordered_lags else 0.0) * 1000
        result.server_cpu_s, client_cpu, others_server, others_client = cpu.read()
        result.server_cpu_share = result.server_cpu_s / result.seconds
        result.client_cpu_share = client_cpu / result.seconds
        result.others_on_server_cpu = others_server / result.seconds
        result.others_on_client_cpu = others_client / result.seconds
        result.closed_early = sum(1 for s, _ in opened if s.closed)
        result.delivered, result.lost, result.duplicates = run.delivered, run.lost, run.duplicates
        if scenario.rate > 0 and run.last_arrival:
            window = max(result.publish_s, run.last_arrival - publish_started)
            result.deliveries_per_s = run.delivered / window
            result.us_per_delivery = result.server_cpu_s / max(1, run.delivered) * 1e6
            if on_sessions:
                net = result.server_cpu_s - result.idle_cpu_share * result.seconds
                result.net_us_per_delivery = net / max(1, run.delivered) * 1e6
            ordered = sorted(run.latencies)
            result.p50_ms = percentile(ordered, 0.50) * 1000
            result.p99_ms = percentile(ordered, 0.99) * 1000
            result.max_ms = ordered[-1] * 1000
            if scenario.storm:  # the bystanders' latency while the storm ran
                ordered = sorted(storm_window)
                result.storm_bystander_deliveries = len(ordered)
                result.p50_ms = percentile(ordered, 0.50) * 1000
                result.p99_ms = percentile(ordered, 0.99) * 1000
                result.max_ms = (ordered[-1] if ordered else 0.0) * 1000
        else:
            result.idle_cpu_s_per_min = result.server_cpu_s / result.seconds * 60
        result.flags = flags(result) + result.flags
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), 60)
        for _, transport in opened:
            transport.close()
        for _, transport in stormed:
            transport.close()
        if proxy is not None:
            proxy.stop()
        server.stop()
        sent.release()
        mapped.close()
        sent_file.unlink(missing_ok=True)
    result.load_after = procfs.loadavg()
    result.verdict = judge(result, scenario)
    return result


async def storm(
    scenario: Scenario,
    port: int,
    redis_url: str,
    duration: float,
    sent_file: Path,
    run: Run,
    server: Server,
    result: Result,
    stormed: list[tuple[StormStream, asyncio.Transport]],
) -> dict[str, Any]:
    """The bystanders' events for ``duration`` s and, after a baseline, the storm: returns the
    publisher's report; the storm's figures go to ``result``, its streams to ``stormed``."""
    spec = STORMS[scenario.name]
    resume_after = (
        await seeded_sessions(redis_url, scenario.storm) if spec.kind != "notifications" else None
    )
    nchan_port = port if server.target == "nchan" else None
    user_header = nchan.USER_HEADER if nchan_port else ""
    requests = storm_requests(spec.kind, port, scenario.storm, resume_after, user_header)
    publisher = asyncio.create_task(
        publish(redis_url, scenario.channels, scenario.rate, duration, sent_file, nchan_port)
    )
    pids = procfs.process_tree(server.pid)
    await asyncio.sleep(1.0)  # the publisher is up
    cpu0, t0 = procfs.tree_cpu(pids), time.monotonic()
    await asyncio.sleep(STORM_BASELINE_SECONDS)
    baseline = (procfs.tree_cpu(pids) - cpu0) / (time.monotonic() - t0)
    lag0 = await server.loop_lag_buckets()
    run.window = array("d")
    cpu0 = procfs.tree_cpu(pids)
    try:
        streams, result.storm_open_s, result.storm_served_s = await open_storm(
            port, requests, spec.owed, b"" if nchan_port else b"retry:"
        )
    finally:
        cpu = procfs.tree_cpu(pids) - cpu0
        run.storm_latencies, run.window = run.window, None
    stormed += streams
    result.storm_streams = sum(1 for s, _ in streams if s.opened.done() and not s.closed)
    net = cpu - baseline * result.storm_served_s
    result.storm_cpu_us_per_open = net / max(1, result.storm_streams) * 1e6
    lag1 = await server.loop_lag_buckets()
    if lag0 is not None and lag1 is not None:
        result.server_loop_lag_p99_ms, result.server_loop_lag_max_ms = lag_quantiles(lag0, lag1)
    if publisher.done() or result.storm_served_s + STORM_BASELINE_SECONDS + 1 > duration:
        result.flags.append("storm outlasted the publisher")
    return await publisher


_seeded: dict[tuple[str, int], list[str]] = {}


async def seeded_sessions(redis_url: str, count: int) -> list[str]:
    """The storm sessions, seeded once per Redis (every target of the run reads the same)."""
    if (redis_url, count) not in _seeded:
        print(f"   seeding {count:,} sessions", flush=True)
        _seeded[redis_url, count] = await seed_sessions(redis_url, count)
    return _seeded[redis_url, count]


def lag_quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    """p99 and max of the server's loop lag between two readings of its histogram, as bucket
    upper bounds (ms)."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    p99 = top = float("inf")
    for le, count in delta.items():
        if p99 == float("inf") and count >= 0.99 * total:
            p99 = le
        if count >= total:
            top = le
            break
    return p99 * 1000, top * 1000


async def main_async(args: argparse.Namespace) -> list[Result]:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # the server's core is the server's
    logs = Path(tempfile.mkdtemp(prefix="capacity-"))
    names = (
        [n for n in SCENARIOS if not SCENARIOS[n].storm and SCENARIOS[n].kind == "notifications"]
        if args.scenario == ["all"]
        else args.scenario
    )
    results: list[Result] = []
    with private_redis(launcher=procfs.pinned(0)) as redis_url:
        for name in names:
            scenario = SCENARIOS[name]
            if args.streams or args.channels or args.rate is not None or args.storm:
                scenario = Scenario(
                    name,
                    args.streams or scenario.streams,
                    args.channels or scenario.channels,
                    scenario.rate if args.rate is None else args.rate,
                    scenario.p99_ms,
                    scenario.us_per_delivery,
                    scenario.kib_per_stream,
                    args.storm or scenario.storm if scenario.storm else 0,
                    scenario.kind,
                )
            for target in args.target:
                storm_sessions = scenario.storm and STORMS[name].kind != "notifications"
                if (storm_sessions or scenario.kind != "notifications") and target != "relay":
                    print(f"-- {name}: not on {target} (it has no session streams)", flush=True)
                    continue
                print(f"-- {name} on {target} (load {procfs.loadavg()})", flush=True)
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
                    args.workers,
                )
                if target == "relay" and args.label:
                    result.target = args.label
                results.append(result)
                print(table([result]).splitlines()[-1], flush=True)
    sessions.compare(results)
    print(f"\n(server logs in {logs})\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", nargs="+", default=["all"], choices=[*SCENARIOS, "all"], metavar="NAME"
    )
    parser.add_argument(
        "--target",
        nargs="+",
        default=["relay"],
        choices=["relay", "reference", "nchan"],
        metavar="TARGET",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds IDLE streams are held")
    parser.add_argument("--streams", type=int, help="override the scenario's streams")
    parser.add_argument("--channels", type=int, help="override the scenario's channels")
    parser.add_argument("--rate", type=float, help="override the scenario's events/s")
    parser.add_argument("--storm", type=int, help="override a storm's streams opened at once")
    parser.add_argument(
        "--server-cmd", help="run this instead of rapidphoto-relay ({port} is replaced)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="RELAY_WORKERS of the relay; above 1 it is not pinned (its processes share the "
        "client's core too)",
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
        procfs.set_priority(args.nice)
    results = uvloop.run(main_async(args))
    print(table(results))
    if args.results:
        command = ".tools/bin/uv run python loadtests/capacity.py " + shlex.join(sys.argv[1:])
        write_results(args.results, results, command)
        print(f"\nwritten to {args.results}/summary.md")


if __name__ == "__main__":
    main()
