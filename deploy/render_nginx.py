"""Render ``deploy/nginx/nginx.conf.template`` for a given set of relays, ports and paths.

The same template serves compose.yaml (where the official nginx image's envsubst step fills it in)
and local runs or tests (this module), so the configuration under test is the one deployed.
Only ``${NGINX_...}`` placeholders are replaced; nginx's own ``$variables`` are left alone, exactly
as envsubst does with ``NGINX_ENVSUBST_FILTER=^NGINX_``. A placeholder without a value is an error.

As a command::

    python deploy/render_nginx.py --prefix /tmp/rp-nginx --listen 127.0.0.1:8088 \\
        --relay 127.0.0.1:8081 --relay 127.0.0.1:8082
    nginx -p /tmp/rp-nginx -c /tmp/rp-nginx/nginx.conf -e stderr -g 'daemon off;'
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

NGINX_DIR: Final = Path(__file__).resolve().parent / "nginx"
TEMPLATE: Final = NGINX_DIR / "nginx.conf.template"
#: Included by every server block of the template; copied next to the rendered file as it is.
LOCATIONS: Final = NGINX_DIR / "rapidphoto-locations.conf"

PLACEHOLDER: Final = re.compile(r"\$\{(NGINX_[A-Z0-9_]+)\}")

#: Health parameters of each relay in the upstream block (see the template's comment on them).
SERVER_PARAMETERS: Final = "max_fails=1 fail_timeout=5s"


class RenderError(ValueError):
    """The template names a placeholder that has no value, or a value is unusable."""


def placeholders(template: str) -> set[str]:
    """Every ``NGINX_*`` name the template needs."""
    return set(PLACEHOLDER.findall(template))


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill in every ``${NGINX_*}`` placeholder; fail naming any that has no value."""
    missing = sorted(placeholders(template) - set(values))
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def relay_servers(relays: Sequence[str]) -> str:
    """The ``server`` lines of the upstream block, on one line (an envsubst value is one line too)."""
    if not relays:
        raise RenderError("at least one relay address is needed")
    for address in relays:
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", address):
            raise RenderError(f"not a host:port address: {address!r}")
    return " ".join(f"server {address} {SERVER_PARAMETERS};" for address in relays)


@dataclass(frozen=True, kw_only=True)
class NginxLayout:
    """Everything that differs between the container and a local, unprivileged nginx."""

    listen: str
    relays: tuple[str, ...]
    access_log: str
    error_log: str
    pid_path: str
    temp_dir: str
    worker_processes: str = "auto"

    @classmethod
    def local(
        cls, prefix: Path, listen: str, relays: Sequence[str], worker_processes: str = "1"
    ) -> NginxLayout:
        """Logs, pid and temporary files all under ``prefix``: no root, nothing in /var."""
        return cls(
            listen=listen,
            relays=tuple(relays),
            access_log=str(prefix / "logs" / "access.log"),
            error_log=str(prefix / "logs" / "error.log"),
            pid_path=str(prefix / "nginx.pid"),
            temp_dir=str(prefix / "tmp"),
            worker_processes=worker_processes,
        )

    def values(self) -> dict[str, str]:
        return {
            "NGINX_LISTEN": self.listen,
            "NGINX_RELAY_SERVERS": relay_servers(self.relays),
            "NGINX_ACCESS_LOG": self.access_log,
            "NGINX_ERROR_LOG": self.error_log,
            "NGINX_PID_PATH": self.pid_path,
            "NGINX_TEMP_DIR": self.temp_dir,
            "NGINX_WORKER_PROCESSES": self.worker_processes,
        }


def write_config(prefix: Path, layout: NginxLayout) -> Path:
    """Write ``nginx.conf`` and its include into ``prefix``; create the log and temp directories."""
    prefix.mkdir(parents=True, exist_ok=True)
    for directory in (Path(layout.access_log).parent, Path(layout.temp_dir)):
        directory.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(TEMPLATE.read_text(encoding="utf-8"), layout.values()), encoding="utf-8")
    shutil.copyfile(LOCATIONS, prefix / LOCATIONS.name)
    return conf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=Path, required=True, help="directory to render into")
    parser.add_argument("--listen", required=True, help="nginx listen address, e.g. 127.0.0.1:8088")
    parser.add_argument(
        "--relay", action="append", required=True, help="a relay's host:port (repeat)"
    )
    parser.add_argument("--workers", default="1", help="worker_processes (default 1)")
    args = parser.parse_args(argv)
    prefix = args.prefix.resolve()
    conf = write_config(prefix, NginxLayout.local(prefix, args.listen, args.relay, args.workers))
    print(f"nginx -p {prefix} -c {conf} -e stderr -g 'daemon off;'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
