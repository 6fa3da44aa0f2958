"""Debian's nginx, run unprivileged from a temporary prefix with the deployed template rendered in.

:func:`nginx_binary` finds nginx, or installs it with ``deploy/ensure-nginx`` (the same script
``scripts/setup`` runs) and fails loudly when that is impossible: a deployment test that silently
skipped would prove nothing.
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from deploy.render_nginx import NginxLayout, write_config

from tests.support.processes import ManagedProcess, wait_until
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
ENSURE_NGINX = ROOT / "deploy" / "ensure-nginx"


@functools.cache
def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    done = subprocess.run(
        [str(ENSURE_NGINX)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"nginx is not installed and {ENSURE_NGINX} could not install it "
            f"(exit {done.returncode}):\n{done.stderr}"
        )
    return done.stdout.strip().splitlines()[-1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxServer:
    """nginx on a free loopback port in front of ``relays`` (``host:port`` strings)."""

    def __init__(self, prefix: Path, relays: Sequence[str], port: int | None = None) -> None:
        self.prefix = prefix
        self.port = port or free_port()
        self.layout = NginxLayout.local(prefix, f"127.0.0.1:{self.port}", relays)
        self.conf = write_config(prefix, self.layout)
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, *extra: str) -> list[str]:
        return [
            nginx_binary(),
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf),
            "-e",
            self.layout.error_log,
            *extra,
        ]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t``: parses the rendered file and everything it includes."""
        return subprocess.run(
            self.argv("-t"), capture_output=True, text=True, timeout=30, check=False
        )

    def start(self) -> NginxServer:
        self.process = ManagedProcess(
            "nginx",
            self.argv("-g", "daemon off;"),
            {"PATH": "/usr/sbin:/usr/bin:/bin"},
            self.prefix,
        ).start()

        def up() -> bool:
            assert self.process is not None
            if not self.process.running():
                raise RuntimeError(f"nginx exited early:\n{self.process.log()}\n{self.error_log()}")
            return _accepts(self.port)

        wait_until(up, timeout=10, what=f"nginx on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def access_log(self) -> str:
        return _read(Path(self.layout.access_log))

    def error_log(self) -> str:
        return _read(Path(self.layout.error_log))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
