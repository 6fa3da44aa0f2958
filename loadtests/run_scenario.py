"""Start a stack for one load-test scenario, run locust headless against it, stop everything.

    .tools/bin/uv run python loadtests/run_scenario.py seed        # 1,000 viewers, 100 events/s, 150 s
    .tools/bin/uv run python loadtests/run_scenario.py heartbeat   # 1,000 idle streams held 90 s+
    .tools/bin/uv run python loadtests/run_scenario.py churn       # 300 churning viewers, ~130 s

The stack: a private ``redis-server`` on a free loopback port (or ``--redis-url``), one
``rapidphoto-worker`` and ``--relays`` ``rapidphoto-relay`` processes (the starters of
``tests/support``), with a fresh ``JWT_SECRET``, the scenario's ``SSE_HEARTBEAT_SECONDS`` and
connection limits well above the test's. The open-file limit is raised first (children inherit it):
1,000 streams need more than 1,024 descriptors in locust and in the relays.

Results go to ``loadtests/results/<scenario>/``: locust's ``locust_*.csv`` and ``report.html``, the
locustfile's ``summary.txt``/``summary.json``/``resources.csv``, ``locust.log`` (console output),
``summary.md`` (the summary with the machine's load average before and after) and ``logs/`` (the
processes' own logs). Exit status: locust's (0 when every threshold held).
Arguments after ``--`` go to locust as they are.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.processes import ManagedProcess, start_relay, start_worker  # noqa: E402
from tests.support.redis_server import RedisServer, free_port, wait_for_redis  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "loadtests" / "results"


@dataclass(frozen=True)
class Defaults:
    users: int
    spawn_rate: int
    run_time: int  # seconds
    heartbeat: int  # the relays' SSE_HEARTBEAT_SECONDS
    extra: tuple[str, ...] = ()


SCENARIOS = {
    # 150 s: ~3 s to create the sessions, 10 s to connect 1,000 viewers, >= 2 min of 100 events/s,
    # 8 s to settle.
    "seed": Defaults(users=1000, spawn_rate=100, run_time=150, heartbeat=15),
    # PROTOCOL §1's 30 s heartbeat; every stream is held past 90 s (the acceptance bar is 60 s).
    "heartbeat": Defaults(
        users=1000, spawn_rate=200, run_time=105, heartbeat=30, extra=("--hold-seconds", "90")
    ),
    "churn": Defaults(
        users=300, spawn_rate=50, run_time=130, heartbeat=15, extra=("--sessions", "200")
    ),
}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False, timeout=5)
        return done.stdout.strip()
    except OSError:
        return Path("/proc/loadavg").read_text().strip()


def code_version() -> str:
    """The commit under test, and whether the services had uncommitted changes (others' work)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "services", "shared"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to locust."
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--users", type=int, help="viewers (default: the scenario's)")
    parser.add_argument("--spawn-rate", type=int, help="viewers connected per second")
    parser.add_argument("--run-time", type=int, help="seconds")
    parser.add_argument("--heartbeat-seconds", type=int, help="the relays' SSE_HEARTBEAT_SECONDS")
    parser.add_argument("--relays", type=int, default=2, choices=(1, 2, 3, 4))
    parser.add_argument("--events-per-second", type=float, default=100.0)
    parser.add_argument("--redis-url", help="use this (loopback) Redis instead of a private one")
    parser.add_argument("--results", type=Path, help="default loadtests/results/<scenario>")
    argv = sys.argv[1:] if argv is None else argv
    locust_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(locust_args) - bool(locust_args)])
    d = SCENARIOS[args.scenario]
    users = args.users or d.users
    spawn_rate = args.spawn_rate or d.spawn_rate
    run_time = args.run_time or d.run_time
    heartbeat = args.heartbeat_seconds or d.heartbeat
    out = (args.results or RESULTS / args.scenario).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    load_before = uptime()
    version = code_version()
    print(f"run_scenario: {args.scenario}; open files {nofile}; load before: {load_before}")

    secret = secrets.token_urlsafe(32)
    redis_server: RedisServer | None = None
    procs: list[ManagedProcess] = []
    code = 1
    try:
        if args.redis_url:
            redis_url = args.redis_url
            wait_for_redis(redis_url)
        else:
            redis_server = RedisServer()
            redis_server.start()
            redis_url = redis_server.url
        procs.append(start_worker(redis_url, logs))
        relay_env = {
            "JWT_SECRET": secret,
            "SSE_HEARTBEAT_SECONDS": str(heartbeat),
            "RELAY_MAX_CONNECTIONS": "20000",
            "RELAY_MAX_CONNECTIONS_PER_USER": "64",
        }
        ports = [free_port() for _ in range(args.relays)]
        for n, port in enumerate(ports, start=1):
            procs.append(
                start_relay(redis_url, port, logs, f"relay-{n}", True, **relay_env)  # ready
            )
        relays = procs[1:]
        argv_locust = [
            str(BIN / "locust"),
            "-f",
            str(ROOT / "loadtests" / "locustfile.py"),
            "--headless",
            "--only-summary",
            "--scenario",
            args.scenario,
            "-u",
            str(users),
            "-r",
            str(spawn_rate),
            "-t",
            f"{run_time}s",
            "--relay-urls",
            ",".join(f"http://127.0.0.1:{p}" for p in ports),
            "--redis-url",
            redis_url,
            "--relay-pids",
            ",".join(str(r.pid) for r in relays),
            "--heartbeat-seconds",
            str(heartbeat),
            "--events-per-second",
            str(args.events_per_second),
            "--csv",
            str(out / "locust"),
            "--html",
            str(out / "report.html"),
            "--summary-dir",
            str(out),
            *d.extra,
            *locust_args,
        ]
        env = {**os.environ, "JWT_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        print("run_scenario:", " ".join(argv_locust), flush=True)
        started = time.monotonic()
        with (out / "locust.log").open("w") as log:
            proc = subprocess.Popen(
                argv_locust, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line.decode("utf-8", errors="replace"))
            # Bounded: locust stops itself at -t; this only guards against a hang after that.
            code = proc.wait(timeout=run_time + 180)
        elapsed = time.monotonic() - started
        for relay in relays:
            if not relay.running():
                print(f"run_scenario: {relay.name} died during the run (see {relay.log_path})")
                code = code or 1
    finally:
        for proc_ in reversed(procs):
            proc_.stop()
        if redis_server is not None:
            redis_server.stop()
    load_after = uptime()
    summary = out / "summary.txt"
    text = summary.read_text() if summary.exists() else "(no summary: the run did not finish)\n"
    (out / "summary.md").write_text(
        f"# Load test `{args.scenario}`\n\n"
        f"Command: `.tools/bin/uv run python loadtests/run_scenario.py {shlex.join(argv)}` "
        f"({users} viewers, {spawn_rate}/s, {run_time} s, {args.relays} relay(s), "
        f"{args.events_per_second:g} events/s); locust took {elapsed:.0f} s, exit code {code}.\n\n"
        f"Code: {version}.\n\n"
        f"Machine: {os.cpu_count()} CPU(s); load before: `{load_before}`; "
        f"after: `{load_after}`.\n\n```\n{text}```\n"
    )
    print(f"run_scenario: load after: {load_after}; results in {out}; exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
