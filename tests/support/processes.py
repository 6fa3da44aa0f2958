"""Start the real ``rapidphoto-worker`` / ``rapidphoto-relay`` processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; raise ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class ManagedProcess:
    """A child process whose output goes to a log file; killed at teardown if still running."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, the crash case: no cleanup runs in the process."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "RELAY_", "SSE_"))}
    env.update({"REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def start_worker(redis_url: str, log_dir: Path, name: str = "worker", **env: str) -> ManagedProcess:
    return ManagedProcess(
        name, [str(BIN / "rapidphoto-worker")], base_env(redis_url, **env), log_dir
    ).start()


def start_relay(
    redis_url: str, port: int, log_dir: Path, name: str = "relay", ready: bool = True, **env: str
) -> ManagedProcess:
    proc = ManagedProcess(
        name,
        [str(BIN / "rapidphoto-relay"), "--host", "127.0.0.1", "--port", str(port)],
        base_env(redis_url, **env),
        log_dir,
    ).start()
    url = f"http://127.0.0.1:{port}/health/{'ready' if ready else 'live'}"

    def up() -> bool:
        if not proc.running():
            raise RuntimeError(f"{name} exited early:\n{proc.log()}")
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    # A ceiling, not a delay: on a busy 2-core machine a relay (or its processes) can take long.
    try:
        wait_until(up, timeout=60, what=f"{name} on port {port}")
    except BaseException:
        proc.stop()  # not handed to the caller: nobody else would stop it
        raise
    return proc
