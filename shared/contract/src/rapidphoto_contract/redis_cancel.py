"""Redis commands that a cancellation always stops, and deadlines that cannot be lost (Python 3.11).

redis-py writes every command under ``asyncio.wait_for`` when its connection has a
``socket_timeout`` (``AbstractConnection.send_packed_command``; redis-py 8 sets 5 s by default).
On Python 3.11 ``wait_for`` loses a cancellation that arrives in the loop iteration in which the
write completes: it returns the write's result instead of raising (CPython gh-86296, bpo-42130;
fixed in 3.12, where gh-96764 rebuilt ``wait_for`` on ``asyncio.timeout``). The command then goes
on as if nothing happened, and the ``asyncio.timeout`` or ``task.cancel()`` that fired is gone for
good. Issue 9, fault 3: ``rapidphoto simulate --wait --timeout`` (and its test) polled Redis
forever; a relay's hub could likewise miss the cancellation that ends it at shutdown.

- :func:`cancel_safe` gives a pool's connections a write under ``asyncio.timeout`` instead (the
  same limit, the same ``redis.TimeoutError`` and disconnect on expiry), which never swallows a
  cancellation. Every pool the product builds goes through it.
- :func:`raise_if_cancelled` re-raises a cancellation that something else swallowed, for loops
  that must end when cancelled whatever library code they call.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: ``asyncio.wait_for`` no longer swallows cancellations from this version on.
FIXED_IN: tuple[int, int] = (3, 12)

PoolT = TypeVar("PoolT", bound=ConnectionPool)


async def _send_packed_command(
    self: Any, command: bytes | str | Iterable[bytes], check_health: bool = True
) -> None:
    """``AbstractConnection.send_packed_command`` of redis-py 8.1, with ``asyncio.timeout`` where
    it has ``asyncio.wait_for`` (the rest as it is there)."""
    if not self.is_connected:
        await self.connect_check_health(check_health=False)
    if check_health:
        await self.check_health()
    if isinstance(command, str):
        command = command.encode()
    if isinstance(command, bytes):
        command = [command]
    try:
        async with asyncio.timeout(self.socket_timeout or None):
            self._writer.writelines(command)
            await self._writer.drain()
    except TimeoutError:  # ours expired (an outer one's cancellation propagates as such)
        await self.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await self.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        # Cancelled half way: part of the command may be sent, the connection is unusable.
        await self.disconnect(nowait=True)
        raise


#: One subclass per connection class (``Connection``, ``SSLConnection``, ...), made once.
_SAFE_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _cancel_safe_class(base: type[AbstractConnection]) -> type[AbstractConnection]:
    if base in _SAFE_CLASSES.values():
        return base  # already safe
    if base not in _SAFE_CLASSES:
        _SAFE_CLASSES[base] = type(
            f"CancelSafe{base.__name__}", (base,), {"send_packed_command": _send_packed_command}
        )
    return _SAFE_CLASSES[base]


def cancel_safe(pool: PoolT) -> PoolT:
    """Make ``pool`` build connections whose writes a cancellation always stops; returns ``pool``.

    Call it on a new pool, before its first command (connections it already made keep their class).
    The connection class is swapped rather than passed to ``from_url``, which picks it from the
    URL's scheme (``redis://``, ``rediss://``, ``unix://``).
    """
    if sys.version_info < FIXED_IN:
        pool.connection_class = _cancel_safe_class(pool.connection_class)
    return pool


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was cancelled and the cancellation was swallowed.

    A task's pending cancellation requests (``Task.cancelling()``) are withdrawn only by
    ``uncancel()``, which whoever handles one properly calls (``asyncio.timeout`` does). Still
    pending while the task runs normal code means a cancellation was lost on the way.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
