"""Event-loop lag: how late the loop runs a timer, as a histogram in ``/metrics``.

Everything the relay does runs on one event loop, so a stall (a burst of stream opens, a full
garbage collection, a slow callback) delays every stream at once. A task asks to wake every
``interval`` and records how much later than asked it woke: cheap (one timer per interval), and a
stall of any cause shows in ``rapidphoto_relay_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, Protocol

#: How often the loop is sampled; a stall shorter than this may fall between two samples.
SAMPLE_SECONDS: Final = 0.05
#: uvloop's timers have a resolution of 1 ms: up to that is not lag.
TIMER_RESOLUTION: Final = 0.001
#: Histogram buckets (seconds): from "on time" to a stall that every client would notice.
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLagMonitor:
    """Samples the running loop's lag into ``histogram`` while started (an async context)."""

    def __init__(self, histogram: Observer, interval: float = SAMPLE_SECONDS) -> None:
        self._histogram = histogram
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLagMonitor:
        self._task = asyncio.create_task(self._run(), name="loop-lag")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval, observe = self._interval, self._histogram.observe
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            observe(max(0.0, loop.time() - due - TIMER_RESOLUTION))
