"""Smoke run of the ``seed`` locust scenario (loadtests/locustfile.py) against a real stack.

50 viewers for 20 s, each on its own session, a publisher at 100 events/s through a real worker and
relay: locust must exit 0 (every threshold held) and its summary must show nothing lost or
duplicated. The full 1,000-viewer runs are ``loadtests/run_scenario.py`` (loadtests/README.md).
Locust runs as a subprocess: it monkey-patches with gevent, which must stay out of pytest.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CPU_HEAVY, TEST_SECRET
from tests.support.processes import BIN, base_env, start_relay, start_worker
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, CPU_HEAVY]


@pytest.mark.timeout(90)
def test_seed_scenario_smoke(redis_url: str, log_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    worker = start_worker(redis_url, log_dir)
    relay = start_relay(redis_url, port, log_dir, JWT_SECRET=TEST_SECRET)
    results = tmp_path / "results"
    try:
        done = subprocess.run(
            [
                str(BIN / "locust"),
                "-f",
                str(ROOT / "loadtests" / "locustfile.py"),
                "--headless",
                "--only-summary",
                "--scenario",
                "seed",
                "-u",
                "50",
                "-r",
                "50",
                "-t",
                "20s",
                "--settle-seconds",
                "5",
                "--relay-urls",
                f"http://127.0.0.1:{port}",
                "--redis-url",
                redis_url,
                "--csv",
                str(results / "locust"),
                "--summary-dir",
                str(results),
            ],
            env=base_env(redis_url, JWT_SECRET=TEST_SECRET),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=70,
            check=False,
        )
    finally:
        relay.stop()
        worker.stop()
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{output}\n--- relay ---\n{relay.log()[-3000:]}"
    summary = json.loads((results / "summary.json").read_text())
    figures = summary["figures"]
    assert summary["passed"], output
    assert figures["alive_at_end"] == 50
    assert figures["events_received"] == figures["events_expected"] > 500
    assert (figures["lost"], figures["duplicates"], figures["unexpected"]) == (0, 0, 0)
    assert figures["latency"]["count"] > 500
    assert "RESULT: PASS" in done.stdout
    assert (results / "locust_stats.csv").read_text().count("publish→receive") == 1
