"""The processes around a capacity run: the server under test (CPU 1), nginx in front of it and
py-spy on it (CPU 0). Redis is ``tests.support.redis_server``'s, pinned to CPU 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from loadtests.bench import SECRET, nchan, reference
from loadtests.bench.procfs import pinned
from tests.support.redis_server import free_port

ROOT: Final = Path(__file__).resolve().parents[2]
BIN: Final = Path(sys.executable).parent
PYSPY_MODE: list[str] = os.environ.get("CAPACITY_PYSPY", "--nonblocking").split()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class Server:
    """The process under test, pinned to CPU 1: the relay, ``server_cmd``, or the reference."""

    def __init__(
        self,
        target: str,
        redis_url: str,
        run_name: str,
        streams: int,
        channels: int,
        logs: Path,
        server_cmd: str | None,
        workers: int = 1,
    ) -> None:
        self.port = free_port()
        self.target = target
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "RELAY_", "SSE_"))},
            "REDIS_URL": redis_url,
            "JWT_SECRET": SECRET,
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(self.port),
            "RELAY_MAX_CONNECTIONS": str(max(10_000, streams)),
            "RELAY_MAX_CONNECTIONS_PER_USER": str(max(32, -(-streams // channels))),
            "RELAY_WORKERS": str(workers),
        }
        cwd: Path | None = None
        if target == "reference":
            argv, cwd = reference.command(self.port, redis_url), ROOT
        elif target == "nchan":
            argv = nchan.command(logs / f"nchan-{run_name}", self.port, redis_url, streams)
        elif server_cmd:
            argv = [part.replace("{port}", str(self.port)) for part in shlex.split(server_cmd)]
        else:
            argv = [str(BIN / "rapidphoto-relay"), "--port", str(self.port)]
        self.log_path = logs / f"{target}-{run_name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                # --workers N > 1: the relay's processes may run on every core (the client's too).
                [*(pinned(1) if workers == 1 else []), *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up, see {self.log_path}")
            with contextlib.suppress(OSError, TimeoutError):
                if b" 200 " in (await self.get("/health/ready"))[:20]:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server not ready after 30 s, see {self.log_path}")

    async def wait_streams_closed(self) -> None:
        """Relay only: until ``/metrics`` shows no open stream (warm-up streams released)."""
        if self.target != "relay":
            await asyncio.sleep(1.0)
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = (await self.get("/metrics")).decode(errors="replace")
            open_now = sum(
                float(line.rsplit(" ", 1)[1])
                for line in body.splitlines()
                if line.startswith("rapidphoto_relay_open_streams{")
            )
            if open_now == 0:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("warm-up streams still open after 30 s")

    async def loop_lag_buckets(self) -> dict[float, float] | None:
        """Relay only: the cumulative buckets of its event-loop lag histogram (``None`` for a
        server without one)."""
        if self.target != "relay":
            return None
        body = (await self.get("/metrics")).decode(errors="replace")
        prefix = 'rapidphoto_relay_event_loop_lag_seconds_bucket{le="'
        buckets = {
            float(line[len(prefix) :].split('"', 1)[0]): float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith(prefix)
        }
        return buckets or None

    def stop(self) -> None:
        stop(self.proc)


class Nginx:
    """The deployed nginx template (``deploy/nginx``) in front of the server, on CPU 0: what a
    stream costs the proxy too (``--via-nginx``)."""

    def __init__(self, folder: Path, upstream_port: int) -> None:
        from deploy.render_nginx import NginxLayout, write_config

        self.port = free_port()
        layout = NginxLayout.local(
            folder, f"127.0.0.1:{self.port}", [f"127.0.0.1:{upstream_port}"], worker_processes="2"
        )
        conf = write_config(folder, layout)
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise SystemExit("--via-nginx: nginx is not installed (deploy/ensure-nginx)")
        argv = [binary, "-p", str(folder), "-c", str(conf), "-e", layout.error_log]
        self.proc = subprocess.Popen(
            [*pinned(0), *argv, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self) -> None:
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        stop(self.proc)


async def start_profiler(
    folder: Path | None, run_name: str, target: str, pid: int
) -> asyncio.subprocess.Process | None:
    """py-spy on the server for the measurement (collapsed stacks; ``--nonblocking``: the server
    is sampled without being paused, so the profile costs it nothing but a little accuracy)."""
    if folder is None:
        return None
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    out = folder / f"{target}-{run_name}.txt"
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200", "--format", "raw"]
    argv += PYSPY_MODE
    return await asyncio.create_subprocess_exec(
        *pinned(0), *argv, "-o", str(out), stdout=asyncio.subprocess.DEVNULL
    )
