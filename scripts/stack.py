"""Run the whole stack locally: Redis (when REDIS_URL is unset), workers, relays, a simulator.

Started by ``scripts/run`` (the README's first command). Prints where to look and stops
everything cleanly on Ctrl-C (SIGINT) or SIGTERM, leaving no process or temporary file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's modules importable
    sys.path.insert(0, str(ROOT))

from scripts.ports import claim_port, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def redis_server_argv(binary: str, port: int, folder: Path) -> list[str]:
    """An in-memory ``redis-server`` on loopback ``port`` (no RDB, no AOF), working in ``folder``.
    Also how the test suite starts its private Redis (``tests/support/redis_server.py``)."""
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    return [*argv, "no", "--dir", str(folder), "--loglevel", "warning"]


def free_cluster_ports(count: int) -> list[tuple[int, int]]:
    """``count`` (port, bus port) pairs for cluster nodes, each leased (scripts/ports.py): a node's
    bus gets a port of its own (``--cluster-port``) rather than the default port + 10000, which
    nobody leased and which must stay at most 65535."""
    return [(free_port(), free_port()) for _ in range(count)]


def cluster_node_argv(binary: str, port: int, bus_port: int, folder: Path) -> list[str]:
    """An in-memory Redis Cluster node on ``port`` (its bus on ``bus_port``), state in ``folder``.

    ``cluster-node-timeout 1000``: a dead master is failed over in about 2-3 s.
    ``cluster-require-full-coverage no``: during a fail-over the healthy shards keep taking writes.
    Diskless replication with no delay: a replica syncs at once and writes no RDB file.
    """
    return [
        *redis_server_argv(binary, port, folder),
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-config-file", f"nodes-{port}.conf",
        "--cluster-node-timeout", "1000",
        "--cluster-require-full-coverage", "no",
        "--repl-diskless-sync", "yes",
        "--repl-diskless-sync-delay", "0",
        "--repl-diskless-load", "on-empty-db",
    ]  # fmt: skip


def cluster_create_argv(ports: list[int], replicas: int = 1) -> list[str]:
    """``redis-cli --cluster create``: the first ``len(ports) / (replicas + 1)`` become masters."""
    cli = shutil.which("redis-cli") or "redis-cli"
    nodes = [f"127.0.0.1:{port}" for port in ports]
    return [
        cli,
        "--cluster",
        "create",
        *nodes,
        "--cluster-replicas",
        str(replicas),
        "--cluster-yes",
    ]


def wait_cluster_ready(ports: list[int], timeout: float) -> None:
    """Until every node says ``cluster_state:ok`` and every replica's link to its master is up."""
    cli = shutil.which("redis-cli") or "redis-cli"
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        port = pending[0]
        info = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
        ).stdout
        repl = subprocess.run(
            [cli, "-p", str(port), "info", "replication"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        synced = "role:master" in repl or "master_link_status:up" in repl
        if "cluster_state:ok" in info and synced:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise SystemExit(f"the cluster node on port {port} is not ready after {timeout}s")
        time.sleep(0.05)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback only)
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready within {timeout}s")


def wait_tcp(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


#: Signals that stop the stack (SIGHUP: the terminal went away).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold off the stop signals: a child started but not yet recorded would be left behind."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _child_setup() -> Callable[[], None]:
    """Run in each child between fork and exec: unblock the stop signals (a child inherits the
    mask :func:`signals_blocked` set), and on Linux have the child get SIGTERM when the stack
    dies, even by SIGKILL (prctl PR_SET_PDEATHSIG), so nothing outlives a stack that could not
    clean up."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    prctl = ctypes.CDLL(name, use_errno=True).prctl if name is not None else None
    pr_set_pdeathsig = 1

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if prctl is not None:
            prctl(pr_set_pdeathsig, signal.SIGTERM)

    return setup


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tmp: Path | None = None
        self._preexec = _child_setup()

    def temp_dir(self) -> Path:
        """A private directory (Redis's), created on first use and removed by :meth:`stop`."""
        if self.tmp is None:
            self.tmp = Path(tempfile.mkdtemp(prefix="rapidphoto-stack-"))
        return self.tmp

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Each child in its own process group: Ctrl-C reaches the stack alone, which then stops
        # the children in order (relays first, so their streams end with STREAM_CLOSED shutdown
        # while Redis is still there) instead of everything at once.
        with signals_blocked():
            proc = subprocess.Popen(
                argv,
                env=env,
                process_group=0,
                preexec_fn=self._preexec,  # safe: the stack runs one thread
            )
            self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        # No second signal may cut this short and leave processes or files behind.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # Reverse start order: simulator and relays first (streams get STREAM_CLOSED shutdown),
        # then workers, then the Redis we started.
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    print(f"[stack] {name} did not stop in 10 s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait(5)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def start_cluster(stack: Stack, env: dict[str, str]) -> None:
    """PROTOCOL §9 locally: six cluster nodes (3 masters, 3 replicas), in memory, and a standalone
    Redis for the arq queue; ``env`` gets REDIS_CLUSTER, REDIS_URL, QUEUE_REDIS_URL and
    REDIS_WAIT_REPLICAS=1."""
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is missing: run scripts/setup")
    folder = stack.temp_dir()
    pairs = free_cluster_ports(6)
    ports = [port for port, _ in pairs]
    procs = [
        stack.spawn(f"redis-node-{port}", cluster_node_argv(redis_bin, port, bus, folder), env)
        for port, bus in pairs
    ]
    queue_port = free_port()
    queue = stack.spawn("redis-queue", redis_server_argv(redis_bin, queue_port, folder), env)
    for port, proc in zip(ports, procs, strict=True):
        wait_tcp(port, 10, proc)
    wait_tcp(queue_port, 10, queue)
    subprocess.run(cluster_create_argv(ports), check=True, capture_output=True, timeout=30)
    wait_cluster_ready(ports, 30)
    env.update(
        REDIS_CLUSTER="1",
        REDIS_URL=f"redis://127.0.0.1:{ports[0]}/0",
        QUEUE_REDIS_URL=f"redis://127.0.0.1:{queue_port}/0",
    )
    env.setdefault("REDIS_WAIT_REPLICAS", "1")
    nodes = ", ".join(str(p) for p in ports)
    print(
        f"[stack] started a Redis Cluster on 127.0.0.1 ports {nodes} (in memory, removed on exit)"
    )
    print(f"[stack] and the queue's Redis on {env['QUEUE_REDIS_URL']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--port", type=int, default=8080, help="first relay port (next ones +1)")
    parser.add_argument("--user", default="demo-user")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--rate", type=float, default=6.0, help="photo outcomes per second")
    parser.add_argument("--failure-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--start-delay",
        type=float,
        default=5.0,
        help="seconds between starting the sessions and their first photo (time to open the page)",
    )
    parser.add_argument("--no-simulate", action="store_true", help="start the services only")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run on a local Redis Cluster (3 masters, 3 replicas) plus a queue Redis "
        "(REDIS_CLUSTER=1; ignores REDIS_URL)",
    )
    args = parser.parse_args()
    # What is printed must show up at once, also when stdout is a pipe or a file.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    stack = Stack()
    try:
        if args.cluster:
            start_cluster(stack, env)
        elif not env.get("REDIS_URL"):
            redis_bin = shutil.which("redis-server")
            if redis_bin is None:
                raise SystemExit("redis-server is missing: run scripts/setup")
            port = free_port()
            argv = redis_server_argv(redis_bin, port, stack.temp_dir())
            redis_proc = stack.spawn("redis", argv, env)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            wait_tcp(port, 10, redis_proc)
            print(
                f"[stack] started redis-server on {env['REDIS_URL']} (in memory, removed on exit)"
            )
        else:
            print(f"[stack] using REDIS_URL={env['REDIS_URL']}")
        if not env.get("JWT_SECRET") and not env.get("JWT_PUBLIC_KEY"):
            env["JWT_SECRET"] = secrets.token_urlsafe(32)
            print("[stack] JWT_SECRET not set: using a random development secret for this run")
        env.setdefault("RELAY_DEMO", "1")

        for i in range(args.workers):
            stack.spawn(f"worker-{i + 1}", [str(BIN / "rapidphoto-worker")], env)

        ports: list[int] = []
        relays: list[subprocess.Popen[bytes]] = []
        for i in range(args.relays):  # all at once: each takes seconds to import and connect
            wanted = args.port + i
            # --port is the person's (or a test's) choice: taken when free. The next ones only
            # when no one else has leased them (scripts/ports.py): another run may be about to
            # bind them.
            taken = port_free(wanted) if i == 0 else claim_port(wanted)
            port = wanted if taken else free_port()
            ports.append(port)
            relays.append(
                stack.spawn(
                    f"relay-{i + 1}",
                    [str(BIN / "rapidphoto-relay"), "--host", "127.0.0.1", "--port", str(port)],
                    env,
                )
            )
        for port, relay in zip(ports, relays, strict=True):
            # 60 s: a relay imports in ~2 s on a quiet machine, but took 30 s on this 2-core
            # machine at a load average of 15 (the stack script's test then failed).
            wait_http(f"http://127.0.0.1:{port}/health/ready", 60, relay)

        token = subprocess.run(
            [str(BIN / "rapidphoto"), "token", args.user, "--ttl", str(12 * 3600)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        session_ids = [f"demo-{args.seed}-{n + 1}" for n in range(args.sessions)]
        query = "&".join(f"session={sid}" for sid in session_ids)
        print("\n[stack] ready.")
        for port in ports:
            print(
                f"  relay      http://127.0.0.1:{port}/  (metrics: http://127.0.0.1:{port}/metrics)"
            )
        print(f"  demo page  http://127.0.0.1:{ports[0]}/demo?access_token={token}&{query}")
        relay_flags = " ".join(f"--relay http://127.0.0.1:{port}" for port in ports)
        print(
            f"  terminal   RAPIDPHOTO_TOKEN={token} .venv/bin/rapidphoto watch {relay_flags} "
            f"--notifications {' '.join(session_ids)}"
        )
        print(f"  API docs   http://127.0.0.1:{ports[0]}/schema")
        print(f"  token for {args.user}: {token}")
        print("  Ctrl-C stops everything.\n")

        if not args.no_simulate:
            stack.spawn(
                "simulator",
                [
                    str(BIN / "rapidphoto"),
                    "simulate",
                    "--user",
                    args.user,
                    "--session-prefix",
                    f"demo-{args.seed}",
                    "--sessions",
                    str(args.sessions),
                    "--photos",
                    str(args.photos),
                    "--rate",
                    str(args.rate),
                    "--failure-ratio",
                    str(args.failure_ratio),
                    "--seed",
                    str(args.seed),
                    "--start-delay",
                    str(args.start_delay),
                ],
                env,
            )
        while True:
            for name, proc in stack.procs:
                if name != "simulator" and proc.poll() is not None:
                    raise SystemExit(f"[stack] {name} exited with {proc.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\n[stack] stopping…")
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
