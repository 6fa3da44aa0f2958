"""The nchan reference target of a capacity run (``--target nchan``): nginx with nchan, the pub/sub
module for nginx written in C (Debian's ``libnginx-mod-nchan``, installed by the opt-in
``loadtests/setup-nchan``, never by the test command).

One nginx worker process (pinned with its master to the server's core), a configuration generated
for the run on a free loopback port, nchan's Redis storage on the run's private Redis (so each
subscription is a Redis subscription, as the relay's is). nchan speaks its own Redis protocol, so
the publisher publishes through nchan's HTTP publisher location instead of ``PUBLISH``; each
subscriber's channel is named by the ``X-Bench-User`` header (nginx cannot decode the JWT; nchan
checks no token: like the bare reference server, it does less than the relay).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

from loadtests.bench import STREAM_PATH

from rapidphoto_contract.keys import NOTIFICATION_CHANNEL_PREFIX

MODULE: Final = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
#: The header that names a subscriber's user (its channel) for nchan.
USER_HEADER: Final = "X-Bench-User"
#: Where the publisher POSTs a payload for ``<channel>`` (the contract's channel name).
PUBLISH_PREFIX: Final = "/pub/"


SETUP: Final = Path(__file__).resolve().parents[1] / "setup-nchan"


def _find() -> str | None:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return found if found is not None and MODULE.is_file() else None


def binary() -> str:
    """nginx, with nchan's module; asking for ``--target nchan`` is the opt-in to install them
    (``loadtests/setup-nchan``, Debian's packages) when they are missing."""
    found = _find()
    if found is None:
        print("--target nchan: installing nginx and nchan (loadtests/setup-nchan)", flush=True)
        subprocess.run([str(SETUP)], check=False)
        found = _find()
    if found is None:
        raise SystemExit("--target nchan: loadtests/setup-nchan could not install nginx + nchan")
    return found


def config(port: int, redis_url: str, streams: int) -> str:
    """nginx.conf for one worker serving the notification stream path through nchan."""
    connections = 2 * streams + 2000
    return f"""
load_module {MODULE};
worker_processes 1;
worker_rlimit_nofile {connections + 1000};
daemon off;
error_log stderr warn;
pid nginx.pid;
events {{ worker_connections {connections}; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    client_body_temp_path tmp;
    proxy_temp_path tmp;
    fastcgi_temp_path tmp;
    uwsgi_temp_path tmp;
    scgi_temp_path tmp;
    nchan_redis_url "{redis_url}";
    nchan_use_redis on;
    nchan_message_buffer_length 10;
    nchan_message_timeout 60s;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location = /health/ready {{ return 200 "ok"; }}
        location = {STREAM_PATH} {{
            nchan_subscriber eventsource;
            # A new subscriber gets what is published from then on (as the relay's notification
            # stream), not the channel's buffer: the scenarios of a run reuse the same channels.
            nchan_subscriber_first_message newest;
            nchan_channel_id "{NOTIFICATION_CHANNEL_PREFIX}$http_x_bench_user";
            nchan_eventsource_ping_interval 15;
        }}
        location ~ ^{PUBLISH_PREFIX}(.+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
        }}
    }}
}}
"""


def command(folder: Path, port: int, redis_url: str, streams: int) -> list[str]:
    """Write the configuration into ``folder`` and return nginx's command line."""
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(config(port, redis_url, streams))
    return [binary(), "-p", str(folder), "-c", str(conf)]
