"""``RELAY_WORKERS`` (supervisor.py), over real processes: N relay processes share one port, each
takes part of the streams, ``/metrics`` sums them, a process that dies is replaced, and SIGTERM to
the supervisor still closes every stream of every process with ``shutdown`` within 5 s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from rapidphoto_relay.supervisor import MIN_UPTIME_SECONDS
from tests.relay.conftest import Relay, RelayFactory, eventually
from tests.support.sse import SSEStream, open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"
STREAMS = 16


def children(pid: int) -> list[int]:
    """The supervisor's relay processes."""
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def age(pid: int) -> float:
    """Seconds since the process started (``/proc``)."""
    start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sockets(pid: int) -> int:
    """Open sockets of a process (a stream is one)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def both_serving(relay: Relay, workers: int) -> list[int]:
    """Until ``workers`` processes have started and subscribed: their pids."""

    def ready() -> bool:
        log = relay.proc.log()
        return (
            len(children(relay.proc.pid)) == workers
            and log.count("Application startup complete") >= workers
            and log.count("redis pub/sub connected") >= workers
        )

    await eventually(ready, 60, what=f"{workers} relay processes")
    return children(relay.proc.pid)


async def test_processes_share_the_port_and_sigterm_closes_every_stream(
    relay_factory: RelayFactory, ids: Ids
) -> None:
    relay = relay_factory(RELAY_WORKERS="2")
    pids = await both_serving(relay, 2)
    before = {pid: sockets(pid) for pid in pids}
    async with contextlib.AsyncExitStack() as stack:
        streams: list[SSEStream] = []
        for _ in range(STREAMS):
            stream = await stack.enter_async_context(
                open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(ids("u")))
            )
            await stream.next_frame()
            streams.append(stream)
        # The kernel spread the connections over both processes (all 16 on one: p = 2^-15).
        assert all(sockets(pid) > before[pid] for pid in pids)
        # Whichever process answers, /metrics counts the streams of both.
        for _ in range(4):
            assert relay.metric("rapidphoto_relay_open_streams", 'kind="notifications"') == STREAMS
        started = time.monotonic()
        relay.proc.signal(signal.SIGTERM)
        endings = await asyncio.gather(*(s.wait_ended(6) for s in streams))
        for frames in endings:
            last = [f for f in frames if f.is_event][-1]
            assert last.json() == {"type": "STREAM_CLOSED", "reason": "shutdown"}
        await eventually(lambda: not relay.proc.running(), 6, what="supervisor exit")
        assert time.monotonic() - started < 5
    assert not any(alive(pid) for pid in pids)


async def test_a_process_that_dies_is_replaced(relay_factory: RelayFactory, ids: Ids) -> None:
    relay = relay_factory(RELAY_WORKERS="2")
    first, second = await both_serving(relay, 2)
    # Older than a crash at start-up (which stops the relay instead of replacing the process).
    await eventually(lambda: age(first) > MIN_UPTIME_SECONDS + 0.5, 30, what="process uptime")
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token(ids("u"))) as stream:
        await stream.next_frame()
        os.kill(first, signal.SIGKILL)
        await eventually(
            lambda: len(children(relay.proc.pid)) == 2 and first not in children(relay.proc.pid),
            30,
            what="a new relay process",
        )
        assert second in children(relay.proc.pid)
        assert '"msg": "relay process exited: starting another"' in relay.proc.log()
    # The dead process's streams no longer count; the new process serves.
    await eventually(
        lambda: relay.metric("rapidphoto_relay_open_streams", 'kind="notifications"') == 0,
        30,
        what="the streams gauge back to 0",
    )
    assert relay.get("/health/live").status_code == 200
