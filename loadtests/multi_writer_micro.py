"""The writer's CPU per delivery, in process: a multi-session stream of 8 lanes against a session
stream, each message pushed to a parked writer and written to a stand-in connection.

    .tools/bin/uv run --frozen python loadtests/multi_writer_micro.py

What ``capacity.py``'s MULTI8/SINGLE8 cannot isolate: there a delivery costs ~90 µs, mostly the
kernel's write and the hub, and runs on a shared machine differ by more than the few µs the multi
stream's cursor framing adds. Here only the Python of ``push`` → ``_deliver`` → ``_take`` (→
``framed`` for the multi stream) → ``encode_chunk`` → ``write`` runs; best of 15 rounds of CPU time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages importable
    sys.path.insert(0, str(ROOT))

from rapidphoto_relay import cursor  # noqa: E402
from rapidphoto_relay.multi_writer import MultiStreamWriter  # noqa: E402
from rapidphoto_relay.payload import Message, parse_payload  # noqa: E402
from rapidphoto_relay.writer import StreamWriter  # noqa: E402

LANES = 8
MESSAGES = LANES * 10_000
ROUNDS = 15


class Connection:
    """What the writer writes to directly (``direct.DirectWriter``'s interface), counting bytes."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        self.written += len(data)


def messages() -> list[Message]:
    """Worker-like ``PHOTO_UPLOADED`` payloads, round-robin over the lanes, as the hub frames them."""
    out = []
    for n in range(MESSAGES):
        lane, seq = n % LANES, n // LANES
        payload = (
            f'{{"type":"PHOTO_UPLOADED","eventId":"1800000000000-{seq}",'
            f'"occurredAt":"2026-12-03T20:00:00.000Z","sessionId":"mb-s{lane}","photoId":"p{seq}",'
            f'"totalPhotos":1000000,"uploadedPhotos":{seq + 1},"failedPhotos":0,'
            f'"progressPercent":0,"status":"IN_PROGRESS"}}'
        )
        message = parse_payload(payload.encode())
        message.observed = True  # the lag histogram is not the writer's cost
        out.append(message)
    return out


def park(writer: StreamWriter) -> Connection:
    connection = Connection()
    writer.in_sync = True
    writer.parked = True
    writer.direct = connection  # type: ignore[assignment]
    return connection


def multi(batch: list[Message]) -> float:
    writer = MultiStreamWriter("m", "u", 1000, time.time() + 3600)
    lanes = [
        writer.add_lane("session", f"mb-s{n}", f"c{n}", cursor.session_tag(f"mb-s{n}"))
        for n in range(LANES)
    ]
    for lane in lanes:
        lane.live = True
        lane.stale = False
        lane.move_to((1, 0))
        lane.floor = (1, 0)
    park(writer)
    started = time.process_time()
    for n, message in enumerate(batch):
        writer.last_write = -1e9  # every delivery its own write, as in MULTI8 (no coalescing)
        lanes[n % LANES].push(message)
    return (time.process_time() - started) / len(batch) * 1e6


def single(batch: list[Message]) -> float:
    writer = StreamWriter("s", "u", 1000, time.time() + 3600)
    writer.floor = (1, 0)
    park(writer)
    started = time.process_time()
    for message in batch:
        writer.last_write = -1e9
        message.chunk = None  # one stream per channel: each message's chunk is encoded for it
        writer.push(message)
    return (time.process_time() - started) / len(batch) * 1e6


def main() -> None:
    batch = messages()
    runs: dict[str, Callable[[list[Message]], float]] = {"multi": multi, "single": single}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(ROUNDS):
        for name, run in runs.items():
            best[name] = min(best[name], run(batch))
    print(
        f"µs of writer CPU per delivery: multi-session stream of {LANES} {best['multi']:.2f}, "
        f"session stream {best['single']:.2f}, difference {best['multi'] - best['single']:.2f}"
    )


if __name__ == "__main__":
    main()
