"""Prometheus metrics of one relay process, in their own registry (served at ``/metrics``).

Under ``--workers N`` (``supervisor.py``) the processes share one port, so each writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` serves the sum over the processes
(``prometheus_client``'s multiprocess mode): gauges over the live ones (``livesum``).

Counters are incremented where the work is done once: ``events_delivered`` by the number of local
subscribers once per message (not once per write), so the hot path pays nothing per delivery.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from rapidphoto_relay.loop_lag import LAG_BUCKETS as LOOP_LAG_BUCKETS

#: Publish-to-write lag buckets (seconds): the acceptance bar is 500 ms (PROTOCOL §1).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    """The directory of the processes' metrics under ``--workers N``, else ``None``."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class RelayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._exposed = self.registry
        if multiprocess_dir() is not None:
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
        self.open_streams = Gauge(
            "rapidphoto_relay_open_streams",
            "SSE streams open now",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.subscribed_channels = Gauge(
            "rapidphoto_relay_subscribed_channels",
            "Redis pub/sub channels this relay is subscribed to (summed over its processes)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events_delivered = Counter(
            "rapidphoto_relay_events_delivered",
            "Live channel messages handed to local streams (one per message and subscriber)",
            registry=r,
        )
        self.events_dropped = Counter(
            "rapidphoto_relay_events_dropped",
            "Channel payloads dropped for breaking the PROTOCOL §4 payload rule",
            ["reason"],
            registry=r,
        )
        self.stream_closes = Counter(
            "rapidphoto_relay_stream_closes",
            "Streams closed, by reason (slow-consumer, token-expired, ...)",
            ["reason"],
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "rapidphoto_relay_slow_consumer_closes",
            "Streams told to close because their bounded buffer overflowed (counted at once;"
            " the stream ends when its client reads again, or is aborted)",
            registry=r,
        )
        #: Bound once: every stream keeps it (a fresh bound method each would cost 64 bytes).
        self.count_slow_consumer = self.slow_consumer_closes.inc
        self.auth_failures = Counter(
            "rapidphoto_relay_auth_failures",
            "Requests refused with 401, by reason",
            ["reason"],
            registry=r,
        )
        self.rejected_streams = Counter(
            "rapidphoto_relay_rejected_streams",
            "Stream requests refused by a connection limit (process: 503, user: 429)",
            ["limit"],
            registry=r,
        )
        self.redis_reconnects = Counter(
            "rapidphoto_relay_redis_reconnects",
            "Times the pub/sub connection was re-established after a failure",
            registry=r,
        )
        self.replays = Counter(
            "rapidphoto_relay_resyncs",
            "Log reads on open or after an outage, by outcome (replay, snapshot, live)",
            ["outcome"],
            registry=r,
        )
        self.pending_connections = Gauge(
            "rapidphoto_relay_pending_connections",
            "Connections waiting for a request head (new, or idle between requests)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "rapidphoto_relay_connections_closed",
            "Connections closed while waiting for a request head: head-timeout (deadline passed),"
            " pending-limit (the oldest, to make room for a new connection)",
            ["reason"],
            registry=r,
        )
        self.delivery_lag = Histogram(
            "rapidphoto_relay_delivery_lag_seconds",
            "From a payload's occurredAt to its first write to a client on this process",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "rapidphoto_relay_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 50 ms (loop_lag.py): every stream of"
            " this process waits that long",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        for kind in ("session", "notifications", "multi"):
            self.open_streams.labels(kind)
        for reason in ("head-timeout", "pending-limit"):
            self.connections_closed.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self._exposed)
