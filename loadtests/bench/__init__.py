"""The pieces of ``loadtests/capacity.py``, the capacity benchmark of one relay process.

- ``procfs``: CPU time, RSS and process trees read from ``/proc``; pinning to a CPU.
- ``client``: the benchmark's own SSE client (raw ``asyncio.Protocol`` per stream).
- ``notify_publisher``: the publisher subprocess (``python -m loadtests.bench.notify_publisher``).
- ``reference``: the bare reference server subprocess (``python -m loadtests.bench.reference``).
- ``targets``: the processes around a run: the server under test, nginx in front, py-spy.
- ``report``: what a run measured, the table, ``summary.md`` and ``results.json``.
- ``sessions``: the multi-session stream against single session streams (MULTI8, SINGLE8).

Shared by the client and the processes it talks to: the names below.
"""

from __future__ import annotations

from typing import Final

#: The key the server under test verifies tokens with (HS256; loopback only).
SECRET: Final = "capacity-secret-capacity-secret-0123456789"
STREAM_PATH: Final = "/api/upload/sessions/notifications/stream"


def user_of(channel: int) -> str:
    """The user whose notification channel is channel number ``channel`` (one user per channel)."""
    return f"cap{channel}"
