"""The registry's ticker (heartbeats, token expiry, stuck writers), in-process."""

from __future__ import annotations

from rapidphoto_relay.registry import (
    ABORT_GRACE_SECONDS,
    HEARTBEAT_JITTER,
    TICK_SECONDS,
    StreamRegistry,
)
from rapidphoto_relay.writer import StreamWriter


def _sub(expires_at: float = 1e12) -> StreamWriter:
    sub = StreamWriter("c", "u", 10, expires_at)
    sub.resync = False
    return sub


def test_ticker_asks_idle_streams_for_heartbeats_only() -> None:
    registry = StreamRegistry(heartbeat_seconds=15, leeway_seconds=0)
    idle, busy = _sub(), _sub()
    registry.add(idle)
    registry.add(busy)
    idle.last_write = 100.0
    busy.last_write = 110.0
    registry.tick(now=116.0, wall=0.0)
    assert idle.heartbeat_due
    assert not busy.heartbeat_due


def test_ticker_closes_expired_tokens_after_the_leeway() -> None:
    registry = StreamRegistry(heartbeat_seconds=15, leeway_seconds=5)
    sub = _sub(expires_at=1000.0)
    registry.add(sub)
    registry.tick(now=0.0, wall=1004.0)
    assert sub.close_reason is None
    registry.tick(now=0.0, wall=1005.0)
    assert sub.close_reason == "token-expired"


def test_ticker_aborts_a_writer_stuck_after_close() -> None:
    registry = StreamRegistry(heartbeat_seconds=15, leeway_seconds=0)
    sub = _sub()
    registry.add(sub)
    sub.close("slow-consumer")
    sub.writing_since = 10.0

    class FakeTask:
        cancelled = False

        def done(self) -> bool:
            return False

        def cancel(self) -> None:
            self.cancelled = True

    task = FakeTask()
    sub.task = task  # type: ignore[assignment]
    registry.tick(now=10.0 + ABORT_GRACE_SECONDS - 1, wall=0.0)
    assert not task.cancelled
    registry.tick(now=10.0 + ABORT_GRACE_SECONDS + 1, wall=0.0)
    assert task.cancelled
    assert sub.aborted


def test_heartbeats_come_a_little_early_and_spread_out() -> None:
    """Streams opened together must not get their heartbeats in the same tick forever (one burst
    of writes holding every live event back), and never later than SSE_HEARTBEAT_SECONDS."""
    registry = StreamRegistry(heartbeat_seconds=15, leeway_seconds=0)
    subs = [_sub() for _ in range(200)]
    for sub in subs:
        registry.add(sub)
    afters = [sub.heartbeat_after for sub in subs]
    low = 15 * (1 - HEARTBEAT_JITTER) - TICK_SECONDS / 2
    assert all(low <= a <= 15 - TICK_SECONDS / 2 for a in afters)
    assert max(afters) - min(afters) > 1.0  # spread over more than one tick
