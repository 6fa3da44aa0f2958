"""What each load-test viewer received, checked against the session's event log in Redis.

A :class:`Lineage` is one viewer of one session across all its connections: the first one starts
with a ``SESSION_SNAPSHOT`` (its ``id`` is the newest log entry it reflects, PROTOCOL §5), every later
one resumes with ``Last-Event-ID``. It is made of :class:`Span`\\ s: a new span starts at each
snapshot, so a reconnection the relay answered with a snapshot (a resynchronisation, not expected
while the log covers the id) is counted and the span after it checked from that snapshot on.

Checking a span (:func:`check_span`) compares the ids it received with the log entries after its
start: each entry missing is *lost*, each id received twice a *duplicate*, an id outside the range
*unexpected*, an id not greater than the one before it *out of order*. A span is checked up to the
end of the log when its viewer was still connected at the end (so nothing may be missing at the
tail), else up to the last id it received (a viewer who left misses what came after, by design).

Pure except :func:`fetch_logs`; percentiles are exact (nearest rank), unlike locust's rounded ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from rapidphoto_contract import keys
from rapidphoto_contract.stream_ids import StreamId, format_stream_id, parse_stream_id


@dataclass
class Span:
    """Events received after one snapshot; ``start`` is the snapshot's id (None: empty log)."""

    start: StreamId | None
    received: list[StreamId] = field(default_factory=list)

    @property
    def last(self) -> StreamId | None:
        return self.received[-1] if self.received else self.start


@dataclass
class Lineage:
    session_id: str
    user_id: str
    spans: list[Span] = field(default_factory=list)
    connections: int = 0
    reconnects: int = 0
    #: Snapshots answered to a ``Last-Event-ID`` reconnection (the log still covered the id).
    resyncs: int = 0
    heartbeats: int = 0
    #: Longest silence between two frames of one connection, seconds.
    max_gap: float = 0.0
    first_open_at: float | None = None
    #: A connection of this lineage is open now.
    connected: bool = False
    #: The viewer itself ended the lineage (churn): checked up to its last event only.
    left: bool = False
    #: Why the relay or the network ended it (``STREAM_CLOSED`` reason, EOF, an error).
    ended_by_relay: str | None = None
    errors: list[str] = field(default_factory=list)

    def cursor(self) -> str | None:
        """The ``Last-Event-ID`` to resume with: the last event received, else the snapshot's id."""
        if not self.spans or self.spans[-1].last is None:
            return None
        last = self.spans[-1].last
        assert last is not None
        return format_stream_id(last)

    def record_snapshot(self, event_id: str | None, resumed: bool) -> None:
        if resumed:
            self.resyncs += 1
        self.spans.append(Span(start=parse_stream_id(event_id)))

    def record_event(self, event_id: str) -> None:
        sid = parse_stream_id(event_id)
        if sid is None:
            self.errors.append(f"event without a stream id: {event_id!r}")
            return
        if not self.spans:
            self.errors.append("event before any snapshot")
            self.spans.append(Span(start=None))
        self.spans[-1].received.append(sid)

    @property
    def alive(self) -> bool:
        return self.connected and self.ended_by_relay is None


@dataclass
class Check:
    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    out_of_order: int = 0

    def add(self, other: Check) -> None:
        self.expected += other.expected
        self.received += other.received
        self.lost += other.lost
        self.duplicates += other.duplicates
        self.unexpected += other.unexpected
        self.out_of_order += other.out_of_order

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.unexpected or self.out_of_order)


def check_span(span: Span, log_ids: Sequence[StreamId], *, to_end: bool) -> Check:
    """Compare ``span`` with the log (see the module docstring for the four counts)."""
    upper = None if to_end else span.last
    expected = [
        sid
        for sid in log_ids
        if (span.start is None or sid > span.start) and (upper is None or sid <= upper)
    ]
    got = set(span.received)
    want = set(expected)
    out_of_order = sum(1 for a, b in zip(span.received, span.received[1:], strict=False) if b <= a)
    return Check(
        expected=len(expected),
        received=len(span.received),
        lost=len(want - got),
        duplicates=len(span.received) - len(got),
        unexpected=len(got - want),
        out_of_order=out_of_order,
    )


def check_lineage(lineage: Lineage, log_ids: Sequence[StreamId], *, to_end: bool) -> Check:
    """Every span of ``lineage``; the last one up to the log's end when ``to_end`` (still
    connected at the end of the run), every other one up to what it received."""
    total = Check()
    for n, span in enumerate(lineage.spans):
        last_span = n == len(lineage.spans) - 1
        total.add(check_span(span, log_ids, to_end=to_end and last_span))
    return total


def fetch_logs(client: redis.Redis, session_ids: Iterable[str]) -> dict[str, list[StreamId]]:
    """Every entry id of each session's event log (``XRANGE``), in log order."""
    sids = sorted(set(session_ids))
    out: dict[str, list[StreamId]] = {}
    for start in range(0, len(sids), 200):
        batch = sids[start : start + 200]
        pipe = client.pipeline(transaction=False)
        for sid in batch:
            pipe.xrange(keys.session_log_key(sid))
        for sid, entries in zip(batch, pipe.execute(), strict=True):
            ids = [parse_stream_id(entry_id) for entry_id, _ in entries]
            out[sid] = [i for i in ids if i is not None]
    return out


def log_ends(logs: dict[str, list[StreamId]]) -> dict[str, StreamId | None]:
    return {sid: (ids[-1] if ids else None) for sid, ids in logs.items()}


def caught_up(lineage: Lineage, end: StreamId | None) -> bool:
    """True when a connected lineage has received the log's newest entry."""
    if end is None or not lineage.spans:
        return True
    last = lineage.spans[-1].last
    return last is not None and last >= end


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values_ms: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values_ms)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 50), 1),
        "p90_ms": round(percentile(ordered, 90), 1),
        "p99_ms": round(percentile(ordered, 99), 1),
        "max_ms": round(ordered[-1], 1) if ordered else math.nan,
    }
