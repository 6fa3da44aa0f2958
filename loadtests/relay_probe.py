"""What the churn scenario reads from the relays: ``/metrics`` gauges and each process's RSS.

The relay's metrics registry is its own (no prometheus process collector), so memory comes from
``/proc`` (``bench.procfs.rss_kib``) for the PIDs the runner passes; without PIDs it is not checked.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

from loadtests.bench.procfs import rss_kib
from loadtests.sse_client import loopback_origin

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)\s*$")


@dataclass(frozen=True)
class RelayGauges:
    subscribed_channels: float
    open_streams: float


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{"name{labels}": value}`` (no labels: just the name)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def read_gauges(relay_url: str, timeout: float = 5.0) -> RelayGauges:
    host, port = loopback_origin(relay_url)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        samples = parse_metrics(resp.read().decode("utf-8", errors="replace"))
    open_streams = sum(
        v for k, v in samples.items() if k.startswith("rapidphoto_relay_open_streams{")
    )
    return RelayGauges(
        subscribed_channels=samples.get("rapidphoto_relay_subscribed_channels", 0.0),
        open_streams=open_streams,
    )


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from ``/proc`` (None when the process is gone)."""
    try:
        return rss_kib(pid) * 1024
    except (OSError, ValueError, IndexError):
        return None
