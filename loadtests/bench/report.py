"""What a capacity run measured, and how it is printed: the table, ``summary.md``, ``results.json``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
#: Flags: the client's own core this busy (or its loop lagging by half the p99 latency); other
#: processes this busy on the server's core while that core was full.
CLIENT_BOUND_SHARE: Final = 0.85
CONTENDED_SHARE: Final = 0.20


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
    storm_streams: int = 0
    storm_open_s: float = 0.0
    storm_served_s: float = 0.0
    storm_cpu_us_per_open: float = 0.0
    storm_bystander_deliveries: int = 0
    server_loop_lag_p99_ms: float | None = None
    server_loop_lag_max_ms: float | None = None
    #: Session scenarios (``bench/sessions.py``): sessions carried, the server's CPU share with the
    #: streams open and idle, and the CPU per delivery once that idle share is subtracted.
    sessions: int = 0
    idle_cpu_share: float = 0.0
    net_us_per_delivery: float = 0.0
    flags: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


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
    if r.storm_streams:
        per = (
            f"storm: {r.storm_cpu_us_per_open:,.0f} µs per open; {r.storm_streams:,} open in "
            f"{r.storm_open_s:.2f} s, served in {r.storm_served_s:.2f} s"
        )
        if r.server_loop_lag_p99_ms is not None:
            per += (
                f"; server loop lag p99 ≤ {r.server_loop_lag_p99_ms:g} ms,"
                f" max ≤ {r.server_loop_lag_max_ms:g} ms"
            )
    if r.sessions and r.rate > 0:
        per += f"; net of idle ({r.idle_cpu_share:.0%}): {r.net_us_per_delivery:.2f}"
    if not r.storm_streams and r.server_loop_lag_p99_ms is not None:
        per += (
            f"; server loop lag p99 ≤ {r.server_loop_lag_p99_ms:g} ms,"
            f" max ≤ {r.server_loop_lag_max_ms:g} ms"
        )
    flags = f" ({', '.join(r.flags)})" if r.flags else ""
    rss = f"{r.kib_per_stream:.1f}"
    if r.sessions:
        rss += f" ({r.kib_per_stream * r.streams / r.sessions:.2f} per session)"
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


def flags(r: Result) -> list[str]:
    """What says more about the machine than the server: a busy or lagging client, a contended
    server core."""
    out = []
    lagging = r.client_lag_p99_ms >= max(1.0, 0.5 * r.p99_ms)
    if r.client_cpu_share >= CLIENT_BOUND_SHARE or (r.rate > 0 and lagging):
        out.append("client-bound")
    full = r.server_cpu_share + r.others_on_server_cpu >= 0.9
    if r.others_on_server_cpu >= CONTENDED_SHARE and full:
        out.append("contended")
    return out
