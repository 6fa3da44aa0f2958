"""Real Redis servers for tests (never fakes): how the suite finds or starts one.

Order (DEVELOPERS.md): ``REDIS_URL`` when set; else a testcontainers Redis when a Docker engine
answers; else a ``redis-server`` binary started on a free port. Tests that kill or restart Redis
always get a private binary server (:class:`RedisServer`), never the shared one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

# One home for these: the stack script (the product's run command) cannot import the tests, the
# other way round is fine. free_port (a leased port: scripts/ports.py, safe under pytest -n and
# concurrent runs) is re-exported here for the suite and the load tests.
from scripts.ports import free_port as free_port
from scripts.stack import redis_server_argv


def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
                if client.ping():
                    return
        except redis.RedisError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"Redis at {url} did not answer within {timeout}s: {last}")


class RedisServer:
    """A ``redis-server`` process on a fixed loopback port that tests may stop and restart.

    ``launcher``: an argv prefix for the server, e.g. ``taskset -c 0`` to pin it to a CPU (the
    capacity benchmark keeps Redis off the core of the server under test).
    """

    def __init__(self, port: int | None = None, launcher: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/setup installs it)")
        self.binary = binary
        self.launcher = list(launcher)
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rapidphoto-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.launcher, *redis_server_argv(self.binary, self.port, self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_redis(self.url)

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone, like a crashed Redis without persistence."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=5,
            check=False,
        )
        return done.returncode == 0
    return False


@contextlib.contextmanager
def shared_redis_url() -> Iterator[str]:
    """The suite's Redis: ``REDIS_URL``, else testcontainers, else a ``redis-server`` binary."""
    env_url = os.environ.get("REDIS_URL", "").strip()
    if env_url:
        wait_for_redis(env_url)
        yield env_url
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    with private_redis() as url:
        yield url


@contextlib.contextmanager
def private_redis(launcher: Sequence[str] = ()) -> Iterator[str]:
    """A private in-memory :class:`RedisServer` for the block: its URL (``launcher``: see there)."""
    server = RedisServer(launcher=launcher)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` (tests each take their own database number)."""
    base, _, last = url.rpartition("/")
    if base.endswith(":/") or not last.isdigit():  # no database part in the URL
        return f"{url.rstrip('/')}/{db}"
    return f"{base}/{db}"
