"""Summarise py-spy's raw (collapsed) stacks as Markdown: where the samples went.

    .venv/bin/python loadtests/profile_summary.py /tmp/prof/relay-STORM.txt --top 30 > summary.md

Three tables: by *area* (the first frame of each stack that falls in one of :data:`AREAS`, read from
the leaf up: "what the process was doing"), by function including callees (*inclusive*: each function
counted once per stack), and by leaf function (*self*). Line numbers are dropped, so a function is
one row. Percentages are of all samples of the file (py-spy samples the Python stacks; time in C
called from Python counts for the Python caller, the event loop's own C code for none).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

_LINE: Final = re.compile(r" \([^()]*:\d+\)$")

#: Areas of a stream open, most specific first: a stack is put in the first area any of its frames
#: (read from the leaf) matches, by function name or file.
AREAS: Final[Sequence[tuple[str, Sequence[str]]]] = (
    ("token verification (PyJWT)", ("jwt/", "TokenVerifier.verify")),
    (
        "logging (JSON lines)",
        ("logging/", "rapidphoto_contract/logs.py", "rapidphoto_relay/logs.py"),
    ),
    ("Redis commands (redis-py)", ("redis/",)),
    ("subscribe (hub)", ("Hub.subscribe", "rapidphoto_relay/hub.py")),
    ("log read / snapshot (replay)", ("rapidphoto_relay/replay.py",)),
    ("stream start (event_stream, writer)", ("event_stream.py", "writer.py", "registry.py")),
    ("stream handler (streams.py)", ("rapidphoto_relay/streams.py",)),
    ("auth guard", ("rapidphoto_relay/auth.py",)),
    ("Litestar (routing, DI, params, response)", ("litestar/",)),
    ("uvicorn / httptools", ("uvicorn/", "rapidphoto_relay/connections.py")),
    ("relay ASGI layers", ("rapidphoto_relay/direct.py", "rapidphoto_relay/headers.py")),
    ("asyncio", ("asyncio/",)),
)


def stacks(lines: Iterable[str]) -> Iterable[tuple[list[str], int]]:
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        yield frames, int(count)


def function(frame: str) -> str:
    return _LINE.sub("", frame)


def area(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for name, marks in AREAS:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def summarise(path: Path, top: int) -> str:
    total = 0
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    with path.open() as file:
        for frames, count in stacks(file):
            total += count
            areas[area(frames)] += count
            for name in {function(f) for f in frames}:
                inclusive[name] += count
            if frames:
                leaf[function(frames[-1])] += count

    def rows(counter: Counter[str], limit: int) -> list[str]:
        return [
            f"| {name.replace('|', '/')} | {n:,} | {n / total:.1%} |"
            for name, n in counter.most_common(limit)
        ]

    out = [
        f"# py-spy profile: `{path.name}`",
        "",
        f"{total:,} samples.",
        "",
        "## By area (first matching frame from the leaf up)",
        "",
        "| area | samples | share |",
        "|---|---|---|",
        *rows(areas, len(areas)),
        "",
        f"## Inclusive (top {top})",
        "",
        "| function | samples | share |",
        "|---|---|---|",
        *rows(inclusive, top),
        "",
        f"## Self (top {top})",
        "",
        "| function | samples | share |",
        "|---|---|---|",
        *rows(leaf, top),
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    sys.stdout.write(summarise(args.profile, args.top))


if __name__ == "__main__":
    main(sys.argv[1:])
