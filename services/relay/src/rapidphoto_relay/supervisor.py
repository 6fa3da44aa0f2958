"""``RELAY_WORKERS`` / ``rapidphoto-relay --workers N``: N relay processes on one port.

One relay process uses one core (one event loop). With ``--workers N`` the command becomes a
supervisor that starts N ordinary relay processes (``python -m rapidphoto_relay.main --workers 1
--reuse-port``), each binding the same address with ``SO_REUSEPORT``: the kernel spreads new
connections over their listening sockets (by a hash of the connection's addresses), so a reconnection
storm is shared by every core. (uvicorn's own ``--workers`` shares one listening socket among its
processes instead, where whichever process wakes first accepts: uneven under a burst, and its
supervisor does not know the relay's shutdown.)

Each process is a whole relay: its own Redis subscription, its own limits (``RELAY_MAX_CONNECTIONS``
and the per-user limit count per process), its own metrics. ``/metrics`` answers from whichever
process the connection lands on, so the processes write their metrics to files in a directory the
supervisor owns (``prometheus_client``'s multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``) and every
process serves the sum: counters and histograms over every process since the supervisor started,
gauges over the live ones. Prometheus sees one relay, as with one process.

Shutdown: SIGTERM or SIGINT to the supervisor is passed to every process as SIGTERM; each closes its
streams (``STREAM_CLOSED shutdown``, PROTOCOL §5) as a single relay does, within the same 5 s. A
process that dies on its own is started again (and its gauges dropped); one that dies within
:data:`MIN_UPTIME_SECONDS` of its start stops the whole relay (a crash loop is not served).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Final

logger = logging.getLogger("rapidphoto_relay.supervisor")

#: Where the processes keep their metrics (prometheus_client's multiprocess mode).
METRICS_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"
#: A process that exits sooner than this after its start is a crash loop: stop everything.
MIN_UPTIME_SECONDS: Final = 5.0
#: After SIGTERM: the processes close their streams within 4 s (main.SHUTDOWN_SECONDS); this is
#: the supervisor's backstop before SIGKILL.
STOP_SECONDS: Final = 8.0
_PR_SET_PDEATHSIG: Final = 1


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEPORT`` when asked), not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the process gets SIGTERM when the supervisor dies, even by SIGKILL (no orphans).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the relay processes (see the module)."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        self.host = host
        self.workers = workers
        # Bound, never listening: it holds the port (port 0 picks one for every process) and gets
        # no connections (only listening sockets share them).
        self._holder = listening_socket(host, port, reuse_port=True)
        self.port: int = self._holder.getsockname()[1]
        self._metrics_dir = tempfile.mkdtemp(prefix="rapidphoto-relay-metrics-")
        self._children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._stopping: int | None = None

    def _spawn(self, index: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "rapidphoto_relay.main",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--reuse-port",
        ]
        env = {**os.environ, METRICS_DIR_VARIABLE: self._metrics_dir, "RELAY_WORKERS": "1"}
        proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)
        self._children[index] = (proc, time.monotonic())
        logger.info("relay process started", extra={"pid": proc.pid, "worker": index})

    def _signal(self, sig: int, _: FrameType | None) -> None:
        if self._stopping is None:
            self._stopping = sig
            for proc, _started in self._children.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0, or 1 after a crash loop)."""
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        try:
            for index in range(self.workers):
                self._spawn(index)
            logger.info(
                "relay supervising",
                extra={"workers": self.workers, "port": self.port, "pid": os.getpid()},
            )
            status = self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._holder.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return status

    def _watch(self) -> int:
        while self._stopping is None:
            time.sleep(0.1)
            for index, (proc, started) in list(self._children.items()):
                code = proc.poll()
                if code is None or self._stopping is not None:
                    continue
                self._forget(proc.pid)
                if time.monotonic() - started < MIN_UPTIME_SECONDS:
                    logger.error(
                        "relay process exited at start-up: stopping",
                        extra={"pid": proc.pid, "worker": index, "status": code},
                    )
                    return 1
                logger.error(
                    "relay process exited: starting another",
                    extra={"pid": proc.pid, "worker": index, "status": code},
                )
                self._spawn(index)
        return 0

    def _forget(self, pid: int) -> None:
        """Drop a dead process's live gauges from the sums (its counters stay counted)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _stop_all(self) -> None:
        procs = [proc for proc, _ in self._children.values()]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                logger.error("relay process did not stop: killed", extra={"pid": proc.pid})
                proc.kill()
                proc.wait()
        self._children.clear()

    @property
    def stopped_by(self) -> int | None:
        """The signal that stopped the relay, if one did."""
        return self._stopping
