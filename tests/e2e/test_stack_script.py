"""``scripts/stack.py`` (what ``scripts/run`` starts), run as a person runs it: it starts Redis (or
uses ``REDIS_URL``), a worker, two relays and a simulated upload, prints where to look, and on
Ctrl-C stops every process it started and removes its temporary directory."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from rapidphoto_contract.events import SessionCompleted, SessionSnapshot
from rapidphoto_tools.realtime import stream
from tests.e2e.conftest import take, to_the_end
from tests.support.processes import wait_until
from tests.support.redis_server import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
STACK = REPO / "scripts" / "stack.py"


@dataclass
class StackRun:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, within: float) -> re.Match[str]:
        compiled = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"stack.py exited ({self.proc.returncode}):\n{self.output()}")
            found[:] = [m for line in list(self.lines) if (m := compiled.search(line))]
            return bool(found)

        wait_until(seen, within, interval=0.05, what=f"stack.py to print {pattern!r}")
        return found[0]

    def children(self) -> dict[int, str]:
        """The stack's child processes now: pid -> command line."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == self.proc.pid:
                out[int(entry.name)] = cmdline
        return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def run_stack() -> Iterator[list[StackRun]]:
    runs: list[StackRun] = []
    yield runs
    for run in runs:  # a failed test must not leave a stack running
        if run.proc.poll() is None:
            ctrl_c(run)
            try:
                run.proc.wait(30)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait(10)
        if run.reader is not None:
            run.reader.join(10)
        if run.proc.stdout is not None:
            run.proc.stdout.close()


def start_stack(runs: list[StackRun], env: dict[str, str], *args: str) -> StackRun:
    proc = subprocess.Popen(
        [str(PYTHON), str(STACK), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, like a job in a terminal
    )
    run = StackRun(proc)
    runs.append(run)

    def read() -> None:  # drain the pipe (the children's logs go there too) so nobody blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            run.lines.append(line.rstrip("\n"))

    run.reader = threading.Thread(target=read, daemon=True)
    run.reader.start()
    return run


def stack_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # (and not PYTHONUNBUFFERED: the stack's output must show up at once without it)
        if not k.startswith(("REDIS_", "JWT_", "RELAY_", "SSE_", "SESSION_", "PYTHONUNBUFFERED"))
    }
    env.update(extra)
    return env


def ctrl_c(run: StackRun) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(run.proc.pid, signal.SIGINT)


def stop_and_check_nothing_left(run: StackRun, children: dict[int, str]) -> float:
    """Ctrl-C; every child gone and the stack exited 0 in time. Returns how long it took."""
    started = time.monotonic()
    ctrl_c(run)
    code = run.proc.wait(30)
    took = time.monotonic() - started
    assert code == 0, run.output()
    assert "[stack] stopping" in run.output()
    wait_until(
        lambda: not any(_alive(pid) for pid in children),
        5,
        what=f"every child of stack.py gone: {children}",
    )
    return took


def test_stack_runs_a_simulation_to_completion_and_ctrl_c_leaves_nothing_behind(
    run_stack: list[StackRun],
) -> None:
    photos, sessions = 12, 2
    port = free_port()
    run = start_stack(
        run_stack,
        stack_env(),
        "--port",
        str(port),
        "--sessions",
        str(sessions),
        "--photos",
        str(photos),
        "--rate",
        "40",
        "--start-delay",
        "1",
        "--seed",
        "7",
    )
    started = time.monotonic()
    demo = run.wait_for_line(r"demo page\s+(http://\S+)", 60).group(1)
    watch_line = run.wait_for_line(r"terminal\s+(RAPIDPHOTO_TOKEN=\S+ (\S+ watch .*))", 10)
    watch_command, watch = watch_line.group(1), watch_line.group(2)
    ready_in = time.monotonic() - started
    assert "[stack] started redis-server on redis://127.0.0.1:" in run.output()
    relays = [int(p) for p in re.findall(r"relay\s+http://127\.0\.0\.1:(\d+)/", run.output())]
    assert len(relays) == 2
    assert relays[0] == port  # the first relay takes --port when it is free

    children = run.children()
    kinds = sorted(
        "redis"
        if "redis-server" in cmd
        else "worker"
        if "rapidphoto-worker" in cmd
        else "relay"
        if "rapidphoto-relay" in cmd
        else "simulator"
        if "rapidphoto simulate" in cmd
        else cmd
        for cmd in children.values()
    )
    assert [k for k in kinds if k != "simulator"] == ["redis", "relay", "relay", "worker"], kinds
    redis_pid = next(pid for pid, cmd in children.items() if "redis-server" in cmd)
    temp = Path(os.readlink(f"/proc/{redis_pid}/cwd"))  # redis-server changes into its --dir
    assert temp.is_dir()
    assert temp.name.startswith("rapidphoto-stack-")

    for relay in relays:
        assert httpx.get(f"http://127.0.0.1:{relay}/health/ready", timeout=5).status_code == 200
    url = urlsplit(demo)
    assert url.path == "/demo"
    assert httpx.get(demo, timeout=5).status_code == 200
    query = parse_qs(url.query)
    token, watched = query["access_token"][0], query["session"]
    assert len(watched) == sessions
    relay_flags = " ".join(f"--relay http://127.0.0.1:{relay}" for relay in relays)
    assert watch == (
        f".venv/bin/rapidphoto watch {relay_flags} --notifications {' '.join(watched)}"
    )

    # Every simulated session completes with all its photos, seen through both relays ...
    asyncio.run(_sessions_complete(relays, token, watched, photos))
    # ... and by the printed terminal view, run as printed from the repository.
    shown = subprocess.run(
        ["bash", "-c", watch_command],
        cwd=REPO,
        env=stack_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"all {sessions} session(s) completed" in shown.stdout
    assert shown.stdout.count(f"100%  {photos}/{photos}") >= sessions, shown.stdout
    delivered = sum(
        float(line.rpartition(" ")[2])
        for relay in relays
        for line in httpx.get(f"http://127.0.0.1:{relay}/metrics", timeout=5).text.splitlines()
        if line.startswith("rapidphoto_relay_events_delivered_total")
    )
    assert delivered > 0

    children = {**children, **run.children()}
    took = stop_and_check_nothing_left(run, children)
    assert not temp.exists(), "the stack's temporary directory is still there"
    assert took < 20
    print(f"stack ready in {ready_in:.1f} s; stopped {len(children)} children in {took:.1f} s")


async def _sessions_complete(
    relays: list[int], token: str, watched: list[str], photos: int
) -> None:
    for n, session in enumerate(watched):
        base = f"http://127.0.0.1:{relays[n % 2]}"
        events = await to_the_end(stream(base, token=token, sessions=[session]), 60)
        final = events[-1]  # the snapshot of a session already completed, or its last event
        assert isinstance(final, SessionCompleted | SessionSnapshot)
        assert final.status == "COMPLETED"
        assert final.uploaded_photos + final.failed_photos == final.total_photos == photos
    # An id older than the log: all of it (PROTOCOL §5).
    base = f"http://127.0.0.1:{relays[1]}"
    async with stream(base, token=token, notifications=True, last_event_id="0-0") as notes:
        got = {getattr(note, "session_id", None) for note in await take(notes, len(watched))}
    assert got == set(watched)


def test_stack_with_redis_url_starts_no_redis(run_stack: list[StackRun], redis_url: str) -> None:
    run = start_stack(
        run_stack,
        stack_env(REDIS_URL=redis_url),
        "--port",
        str(free_port()),
        "--no-simulate",
    )
    run.wait_for_line(r"demo page\s+http://", 60)
    assert f"[stack] using REDIS_URL={redis_url}" in run.output()
    assert "started redis-server" not in run.output()
    children = run.children()
    assert not [cmd for cmd in children.values() if "redis-server" in cmd], children
    assert len(children) == 3  # a worker, two relays
    for port in re.findall(r"relay\s+http://127\.0\.0\.1:(\d+)/", run.output()):
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
    stop_and_check_nothing_left(run, children)
