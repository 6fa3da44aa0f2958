"""At most one write per stream per ``WRITE_INTERVAL_SECONDS``: the held frames, flushed by one timer.

On this kind of machine a ``write`` to a TCP socket costs the relay 5-10 µs of kernel time whatever
it carries, far more than the Python around it, so the number of writes is what sets the capacity of
a broadcast. A stream is written at most once per ``WRITE_INTERVAL_SECONDS`` (``writer.py``): a frame
that comes sooner after the previous write is held in the stream's buffer, and the
:class:`Coalescer` writes everything held, as one chunk, when the interval is over. A stream whose
events come less often than that (most of them) is never delayed; a broadcast of 100 events/s to
1,000 streams makes about 40,000 writes/s instead of 100,000, for at most 25 ms of added latency
(Centrifuge's ``WriteDelay`` makes the same trade). One timer for the whole process, not one per
stream: an idle stream keeps no timer at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger("rapidphoto_relay.coalescer")


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what was held for this stream (or hand it to the stream's task)."""


class Coalescer:
    """The streams holding frames for their next write slot, flushed together by one timer."""

    def __init__(self) -> None:
        self._held: list[Flushable] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, stream: Flushable, due: float) -> None:
        """Flush ``stream`` at ``due`` (``time.monotonic()``) or sooner; once per stream and slot."""
        self._held.append(stream)
        if self._timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            # Everything held is flushed at the first due time: a stream written a little sooner
            # than its interval costs nothing, one timer for all of them saves a lot.
            self._timer = loop.call_later(max(0.0, due - time.monotonic()), self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for stream in held:
            try:
                stream.flush()
            except Exception:  # one broken stream must not keep the others' frames held
                log.exception("flushing a stream failed")
