"""One open stream's lifecycle: :class:`StreamState`, the base of its
:class:`~rapidphoto_relay.writer.StreamWriter` (one object per stream: the split is for reading).

Who the stream is (channel, user, token expiry), why it ends (``close_reason``, first one wins),
whether it must read the log again (``resync``), and its task: the sleep the writer's ``wait`` is
built on, the wake-up every producer calls (never blocking), and :meth:`StreamState.abort` for a
task stuck on a client that stopped reading.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Literal, TypeAlias

from rapidphoto_contract.events import CloseReason

#: Why a stream ends: one of the contract's ``CloseReason`` (``completed``, ``token-expired``,
#: ``slow-consumer``, ``shutdown``, ``forbidden``, ``session-not-found``), sent as ``STREAM_CLOSED``
#: (PROTOCOL §5); or ``disconnected``, the client went away: nobody is left to tell.
EndReason: TypeAlias = CloseReason | Literal["disconnected"]
DISCONNECTED: Final = "disconnected"


class StreamState:
    __slots__ = (
        "_loop",
        "_waiter",
        "aborted",
        "channel",
        "close_reason",
        "expires_at",
        "opened_at",
        "resync",
        "task",
        "user_id",
    )

    def __init__(self, channel: str, user_id: str, expires_at: float) -> None:
        self.channel = channel
        self.user_id = user_id
        #: Wall-clock time (epoch seconds) at which the stream closes with ``token-expired``.
        self.expires_at = expires_at
        self.close_reason: EndReason | None = None
        #: The stream must (re)read the log before writing live messages: set at open and after
        #: the hub resubscribed following a Redis outage (PROTOCOL §5).
        self.resync = True
        self.opened_at = time.monotonic()
        self.task: asyncio.Task[object] | None = None
        self.aborted = False
        self._waiter: asyncio.Future[None] | None = None
        #: Cached: ``asyncio.get_running_loop()`` costs a ``getpid()`` system call every time.
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self, reason: EndReason) -> None:
        """Ask the task to end the stream with ``reason`` (the first reason wins)."""
        if self.close_reason is None:
            self.close_reason = reason
        self.wake()

    def request_resync(self) -> None:
        self.resync = True
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        """Cancel a task that cannot finish (its client is not reading).

        The task notices ``aborted``, swallows the cancellation and returns without completing the
        response, which makes the server close the connection.
        """
        task = self.task
        if self.aborted or task is None or task.done():
            return
        self.aborted = True
        task.cancel()

    async def _sleep(self, seconds: float | None) -> None:
        """Until :meth:`wake` (or ``seconds`` pass)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        try:
            if seconds is None:
                await waiter
            else:
                try:
                    async with asyncio.timeout(seconds):
                        await waiter
                except TimeoutError:
                    pass
        finally:
            self._waiter = None
