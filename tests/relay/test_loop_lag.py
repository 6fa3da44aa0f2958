"""The event-loop lag histogram (``loop_lag.py``): a stall of the loop is recorded as such, and a
running relay serves the histogram in ``/metrics``."""

from __future__ import annotations

import asyncio
import time

from rapidphoto_relay.loop_lag import LoopLagMonitor
from tests.relay.conftest import Relay
from tests.support.processes import wait_until

LAG = "rapidphoto_relay_event_loop_lag_seconds"


class Recorded:
    """An observer that keeps every value and wakes whoever waits for the next one."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.observed = asyncio.Event()

    def observe(self, amount: float) -> None:
        self.values.append(amount)
        self.observed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.values) < count:
                self.observed.clear()
                await self.observed.wait()


async def test_a_blocked_loop_is_recorded_as_lag() -> None:
    recorded = Recorded()
    async with LoopLagMonitor(recorded, interval=0.01):
        await recorded.wait_for(2)
        before = len(recorded.values)
        # A stall: a callback that holds the loop for 200 ms.
        asyncio.get_running_loop().call_soon(time.sleep, 0.2)
        await recorded.wait_for(before + 2)
    assert max(recorded.values[before:]) >= 0.15
    assert min(recorded.values) >= 0


async def test_the_monitor_stops_with_its_context() -> None:
    recorded = Recorded()
    async with LoopLagMonitor(recorded, interval=0.01):
        await recorded.wait_for(1)
    stopped_at = len(recorded.values)
    await asyncio.sleep(0.05)  # five intervals: a monitor still running would have observed
    assert len(recorded.values) == stopped_at


def test_the_relay_serves_the_histogram(relay: Relay) -> None:
    wait_until(lambda: relay.metric(f"{LAG}_count") >= 2, 10, 0.05, "loop lag samples")
    assert f'{LAG}_bucket{{le="0.005"}}' in relay.get("/metrics").text
