"""The 60-second soak (loadtests/soak.py) against real processes: 2 relays, a worker, a Redis.

200 viewers that read, disconnect and resume with ``Last-Event-ID`` on the other relay, 50 photos/s
through the real worker, one relay restarted (SIGTERM, then started again) every 25 s. Every event
each viewer received is checked against its session's log: nothing lost, nothing duplicated, nothing
out of order, no resume answered with a snapshot; at the end both relays are back to 0 open streams
and 0 subscribed channels. The hour run (and its RSS rule, meaningless over a minute) is in
loadtests/README.md. soak.py runs as a subprocess: it monkey-patches with gevent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CPU_HEAVY

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, CPU_HEAVY]


@pytest.mark.timeout(115)
def test_soak_60s(tmp_path: Path) -> None:
    results = tmp_path / "soak"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtests" / "soak.py"),
            "--duration",
            "60",
            "--streams",
            "200",
            "--restart-every",
            "25",
            "--segment",
            "3",
            "12",
            "--results",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=105,
        check=False,
    )
    output = done.stdout[-6000:] + done.stderr[-6000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["fatal"] is None, output
    assert summary["events_received"] == summary["events_expected"] > 2000, output
    assert (summary["lost"], summary["duplicated"], summary["unexpected"]) == (0, 0, 0), output
    assert summary["out_of_order"] == 0, output
    assert summary["resyncs"] == 0, output
    assert summary["viewers_not_caught_up_at_end"] == 0, output
    assert len(summary["relay_restarts"]) == 2, output
    assert summary["connections"]["STREAM_CLOSED shutdown"] > 0, output  # restarts hit viewers
    assert summary["connections"]["resumes (Last-Event-ID)"] > 200, output
    assert (summary["streams_at_end"], summary["channels_at_end"]) == (0, 0), output
    assert done.returncode == 0, output
    assert (results / "resources.csv").read_text().count("\n") > 5
    assert (results / "soak.png").read_bytes().startswith(b"\x89PNG")
