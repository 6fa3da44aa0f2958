"""The publisher of a capacity run: a subprocess, so that a busy client cannot delay publishing.

``PUBLISH``es contract ``notification`` payloads at a steady rate, round-robin over the channels,
and stamps each event's send time (``CLOCK_MONOTONIC``, shared by every process) in a shared
``mmap``, where the client reads it: latency is publish → the client's read of the frame.

    python -m loadtests.bench.notify_publisher --redis-url U --channels N --rate R \\
        --duration S --sent FILE        # prints one JSON line: what it published, when
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import mmap
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.bench import user_of
from loadtests.bench.procfs import pinned

ROOT = Path(__file__).resolve().parents[2]
MODULE = "loadtests.bench.notify_publisher"


async def publish(
    redis_url: str,
    channels: int,
    rate: float,
    duration: float,
    sent_file: Path,
    nchan_port: int | None = None,
    sessions: bool = False,
) -> dict[str, Any]:
    """Run the publisher on CPU 0 until it is done: its report (published, started, seconds,
    late_ticks). ``nchan_port``: publish through nchan's HTTP publisher there instead;
    ``sessions``: worker events on the session channels of ``bench/sessions.py`` instead."""
    publisher = await asyncio.create_subprocess_exec(
        *pinned(0),
        sys.executable,
        "-m",
        MODULE,
        "--redis-url",
        redis_url,
        "--channels",
        str(channels),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--sent",
        str(sent_file),
        *([] if nchan_port is None else ["--nchan-port", str(nchan_port)]),
        *(["--sessions"] if sessions else []),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(publisher.communicate(), duration + 60)
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


class NchanPublisher:
    """POSTs payloads to nchan's publisher location (``bench/nchan.py``), pipelined on one
    keep-alive connection: one write for a tick's requests, then their responses read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def publish(self, payloads: Sequence[tuple[str, str]]) -> None:
        from loadtests.bench.nchan import PUBLISH_PREFIX

        out = bytearray()
        for channel, payload in payloads:
            body = payload.encode()
            out += (
                f"POST {PUBLISH_PREFIX}{channel} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        self.sock.sendall(out)
        answered, buf = 0, b""
        while answered < len(payloads):
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("nchan closed the publisher's connection")
            buf += data
            answered = buf.count(b"HTTP/1.1 ")
        if b"HTTP/1.1 5" in buf or b"HTTP/1.1 4" in buf:
            raise RuntimeError(f"nchan refused a publish: {buf[:200]!r}")

    def close(self) -> None:
        self.sock.close()


def notification_payload(channel: int, seq: int, base_ms: int, occurred: str) -> str:
    """A contract ``notification`` to user ``channel``, its ``eventId`` carrying ``seq``."""
    from rapidphoto_contract.events import Notification

    return Notification(
        event_id=f"1-{seq}",
        occurred_at=occurred,
        kind="CAPACITY",
        user_id=user_of(channel),
        session_id="capacity",
        total_photos=1,
        uploaded_photos=1,
        failed_photos=0,
    ).to_json()


def session_payload(channel: int, seq: int, base_ms: int, occurred: str) -> str:
    """A ``PHOTO_UPLOADED`` of session ``mb-s<channel>`` as the worker publishes it, with the log
    id ``<base_ms>-<seq>`` (``bench/sessions.py``'s clients count these by ``sessions.MARKER``)."""
    from loadtests.bench.sessions import TOTAL_PHOTOS, session_of

    from rapidphoto_contract.events import STATUS_IN_PROGRESS, PhotoUploaded

    return PhotoUploaded(
        event_id=f"{base_ms}-{seq}",
        occurred_at=occurred,
        session_id=session_of(channel),
        photo_id=f"p{seq}",
        total_photos=TOTAL_PHOTOS,
        uploaded_photos=seq + 1,
        failed_photos=0,
        progress_percent=0,
        status=STATUS_IN_PROGRESS,
    ).to_json()


def main(argv: Sequence[str]) -> None:
    # Imported here: the client process imports this module for ``publish`` only.
    import redis
    from loadtests.bench.sessions import session_of

    from rapidphoto_contract.keys import notification_channel, session_channel

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--sent", type=Path, required=True, help="mmap'ed file of send times")
    parser.add_argument("--nchan-port", type=int, help="POST to nchan on 127.0.0.1 instead")
    parser.add_argument(
        "--sessions",
        action="store_true",
        help="PHOTO_UPLOADED on the channels of sessions mb-s<n> (bench/sessions.py)",
    )
    args = parser.parse_args(argv)
    channels = args.channels
    if args.sessions:
        names = [session_channel(session_of(c)) for c in range(channels)]
        payload_of = session_payload
    else:
        names = [notification_channel(user_of(c)) for c in range(channels)]
        payload_of = notification_payload
    # Log ids "<ms>-<seq>" newer than any log entry seeded before the run: the relays take them
    # for log entries (a multi stream moves its cursor on each); seq counts per channel from 0.
    base_ms = int(time.time() * 1000)
    with args.sent.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 0)
    sent = memoryview(mapped).cast("d")
    capacity = len(sent)
    client = redis.Redis.from_url(args.redis_url)
    nchan = None if args.nchan_port is None else NchanPublisher(args.nchan_port)
    tick = max(1.0 / args.rate, 0.001)
    owed, published, late_ticks = 0.0, 0, 0
    start = time.monotonic()
    next_tick = start
    while time.monotonic() - start < args.duration and published < capacity:
        owed += args.rate * tick
        count = min(int(owed), capacity - published)
        owed -= count
        if count:
            stamp = dt.datetime.now(dt.UTC)
            occurred = f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"
            pipe = client.pipeline(transaction=False)
            payloads: list[tuple[str, str]] = []
            for g in range(published, published + count):
                channel = g % channels
                payload = payload_of(channel, g // channels, base_ms, occurred)
                payloads.append((names[channel], payload))
                pipe.publish(names[channel], payload)
            now = time.monotonic()
            for g in range(published, published + count):
                sent[g] = now
            if nchan is None:
                pipe.execute()
            else:
                nchan.publish(payloads)
            published += count
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late_ticks += 1
    elapsed = time.monotonic() - start
    client.close()
    if nchan is not None:
        nchan.close()
    sent.release()
    mapped.close()
    report = {
        "published": published,
        "started": start,
        "seconds": elapsed,
        "late_ticks": late_ticks,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
