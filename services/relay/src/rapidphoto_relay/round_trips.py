"""Commands issued together share a round trip: the relay's Redis client for its reads.

A reconnection storm opens hundreds of streams in the same instant, and each open reads Redis (the
newest notification id, the session's owner and log, the notifications or events to replay). Sent
one by one, every command pays redis-py's whole path: a connection taken from the bounded pool
(a condition, a deadline, a liveness check), the retry wrapper, a write, a read, the release: most
of a stream open's Redis cost (``loadtests/results/storm``), and the pool's 32 connections are
soon all busy, so the rest queue on the pool's condition.

:class:`SharedRoundTrips` is the ``redis.asyncio.Redis`` the relay reads with: a command issued
while others are waiting for the next loop iteration goes out with them, as one pipeline (no
``MULTI``: each command is answered as it would be alone, errors included), on one connection, in
one write. A command alone goes out alone, as before. Pipelines the caller builds itself
(``LogReader.probe_session``) are left as they are. The same pool, retries and cancellation rules
apply: a pipeline is retried on a broken connection as a command is, and a caller that is cancelled
only stops waiting (its reply is read and dropped with the others).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

#: Commands sent in one pipeline at most; a larger burst is split (bounded writes and replies).
MAX_BATCH: Final = 256

_Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class SharedRoundTrips(aioredis.Redis):
    """``redis.asyncio.Redis`` whose concurrent commands share pipelines (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[_Pending] = []
        self._flushing: set[asyncio.Task[None]] = set()
        #: Round trips made for more than one command, and the commands they carried (tests).
        self.shared_round_trips = 0
        self.shared_commands = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((args, options, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            task = asyncio.ensure_future(self._send(pending[start : start + MAX_BATCH]))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            args, options, future = batch[0]
            try:
                result = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            except (TimeoutError, RedisError, OSError) as exc:
                _settle(future, exc)
            except BaseException as exc:  # cancelled (shutdown): so are the callers
                _settle(future, exc)
                raise
            else:
                _settle(future, result)
            return
        try:
            async with self.pipeline(transaction=False) as pipe:
                for args, options, _ in batch:
                    pipe.execute_command(*args, **options)
                results = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            for _, _, future in batch:
                _settle(future, exc)
            return
        except BaseException as exc:
            for _, _, future in batch:
                _settle(future, exc)
            raise
        self.shared_round_trips += 1
        self.shared_commands += len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            _settle(future, result)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        for task in list(self._flushing):
            task.cancel()
        await asyncio.gather(*self._flushing, return_exceptions=True)
        await super().aclose(close_connection_pool)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return  # its caller was cancelled: the reply is dropped
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
