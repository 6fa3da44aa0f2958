"""Run the Redis fault matrix (tests/e2e/test_redis_fault_matrix.py) and print its results table.

    uv run --frozen python loadtests/fault_matrix.py [--json results.json] [-k pause]

Each test of the module prints one ``FAULT-MATRIX {json}`` line with what it measured (before its
assertions, so a failing fault is measured too); this collects them into the table of
docs/operations.md ("Redis faults: what clients see"). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MODULE = "tests/e2e/test_redis_fault_matrix.py"
MARKER = "FAULT-MATRIX "


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}x {status}" for status, n in sorted(counts.items())) or "none"


def _seconds(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{max(known):.2f} s" if known else "n/a"


def row(result: dict[str, Any]) -> str:
    opened = result["open_streams"]
    new = result["new_streams"]
    jobs = result["jobs"]
    normal = result["time_to_normal_s"].values()
    ends = ", ".join(f"{n}x {reason}" for reason, n in sorted(opened["stream_ends"].items()))
    refused = jobs["enqueue_refusals"]
    return " | ".join(
        [
            f"| {result['fault']} ({result['fault_seconds']:.1f} s)",
            f"{opened['clients']} clients, ends: {ends}; {opened['reconnects']} reconnections",
            f"{new['probes']} probes: {_statuses(new['statuses'])}"
            + (f" (Retry-After {', '.join(new['retry_after'])})" if new["retry_after"] else ""),
            f"{jobs['enqueued']} enqueued"
            + (
                f", {sum(refused.values())} enqueues refused ({', '.join(refused)})"
                if refused
                else ""
            )
            + f"; {jobs['worker_failed']} failed; worker exits {len(jobs['worker_exits'])}",
            _seconds([n["first_new_stream"] for n in normal]),
            _seconds([n["first_new_event"] for n in normal]) + " |",
        ]
    )


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| fault (length) | open streams | new stream requests | jobs "
        "| first new stream after the fault | first new event delivered |\n"
        "|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(row(r) for r in results)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("-k", help="pytest -k expression (a subset of the faults)")
    options = parser.parse_args()
    argv = [sys.executable, "-m", "pytest", MODULE, "-q", "-s", "-p", "no:randomly"]
    if options.k:
        argv += ["-k", options.k]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    results = [
        json.loads(line[len(MARKER) :])
        for line in done.stdout.splitlines()
        if line.startswith(MARKER)
    ]
    print(done.stdout.splitlines()[-1] if done.stdout else done.stderr[-2000:])
    print(table(results))
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
