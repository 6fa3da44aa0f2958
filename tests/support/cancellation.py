"""Checking that a cancellation always stops a task, whichever event-loop step it lands in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


async def assert_cancellation_lands_at_every_step(
    start: Callable[[], Coroutine[Any, Any, object]], steps: int = 16
) -> None:
    """Start ``start()`` as a task and cancel it after 0, 1, … ``steps - 1`` loop steps in turn;
    each time the task must end cancelled. On Python 3.11 redis-py's writes swallowed a
    cancellation landing in one particular step (issue 9, fault 3)."""
    for step in range(steps):
        task = asyncio.create_task(start())
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)  # asyncio.wait never cancels it
        for _ in range(100):  # the bug: cancel again until it lands, so the test ends
            if task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        assert done, f"a cancellation {step} loop steps in was lost"
        assert task.cancelled()
