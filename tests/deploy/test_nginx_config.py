"""The nginx template (deploy/nginx/): it renders, ``nginx -t`` accepts it, and it says what SSE needs.

The behaviour behind a real relay (unbuffered delivery, fail-over, redaction end to end) is in
tests/e2e/test_nginx.py; here the file itself is checked, plus the log redaction against a stub
upstream, which needs no relay.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deploy.render_nginx import (
    LOCATIONS,
    TEMPLATE,
    NginxLayout,
    RenderError,
    placeholders,
    relay_servers,
    render,
)

from rapidphoto_contract.settings import Settings
from tests.deploy.nginx_conf import Directive, find, one, parse, seconds, walk
from tests.support.nginx import NginxServer, nginx_binary
from tests.support.processes import wait_until
from tests.support.redis_server import free_port

STREAM_LOCATION = "/api/upload/sessions/"


@pytest.fixture
def rendered(tmp_path: Path) -> NginxServer:
    return NginxServer(tmp_path / "nginx", ["127.0.0.1:18081", "127.0.0.1:18082"])


@pytest.fixture
def http_block(rendered: NginxServer) -> list[Directive]:
    block: list[Directive] = one(parse(rendered.conf), "http")["block"]
    return block


def stream_location(http_block: list[Directive]) -> list[Directive]:
    server = one(http_block, "server")["block"]
    block: list[Directive] = one(server, "location", STREAM_LOCATION)["block"]
    return block


def test_every_placeholder_has_a_value_and_every_value_a_placeholder() -> None:
    template = TEMPLATE.read_text()
    layout = NginxLayout.local(Path("/x"), "127.0.0.1:1", ["127.0.0.1:2"])
    assert placeholders(template) == set(layout.values())
    # envsubst would also replace the bare $NAME form; the template only uses ${NAME}.
    assert "$NGINX_" not in template
    assert placeholders(LOCATIONS.read_text()) == set()


def test_render_names_a_missing_placeholder() -> None:
    with pytest.raises(RenderError, match="NGINX_LISTEN"):
        render("listen ${NGINX_LISTEN}; set $x ${uri};", {})
    assert render("a ${NGINX_A} $host ${pre}", {"NGINX_A": "1"}) == "a 1 $host ${pre}"


@pytest.mark.parametrize("bad", [[], ["relay-1"], ["127.0.0.1:80; evil"], ["host:port"]])
def test_relay_addresses_are_checked(bad: list[str]) -> None:
    with pytest.raises(RenderError):
        relay_servers(bad)


def test_nginx_accepts_the_rendered_config(rendered: NginxServer) -> None:
    done = rendered.test_config()
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_stream_location_passes_events_through_unbuffered(http_block: list[Directive]) -> None:
    location = stream_location(http_block)
    assert one(location, "proxy_pass")["args"] == ["http://rapidphoto_relays"]
    assert one(location, "proxy_buffering")["args"] == ["off"]
    assert one(location, "proxy_cache")["args"] == ["off"]
    assert one(location, "gzip")["args"] == ["off"]
    assert "text/event-stream" not in one(http_block, "gzip_types")["args"]
    # Longer than the heartbeat, or nginx would cut idle-but-alive streams.
    read_timeout = seconds(one(location, "proxy_read_timeout")["args"][0])
    assert read_timeout >= 3600 > 4 * Settings().sse_heartbeat_seconds


def test_upstream_keepalive_and_http11(http_block: list[Directive]) -> None:
    upstream = one(http_block, "upstream", "rapidphoto_relays")["block"]
    assert int(one(upstream, "keepalive")["args"][0]) > 0
    servers = find(upstream, "server")
    assert [s["args"][0] for s in servers] == ["127.0.0.1:18081", "127.0.0.1:18082"]
    assert all("max_fails=1" in s["args"] for s in servers)
    assert one(http_block, "proxy_http_version")["args"] == ["1.1"]
    assert one(http_block, "proxy_set_header", "Connection")["args"] == ["Connection", ""]


def test_no_location_replaces_the_proxy_headers(http_block: list[Directive]) -> None:
    """A proxy_set_header in a location drops every inherited one, Connection "" included."""
    server = one(http_block, "server")["block"]
    assert [d for d in walk(server) if d["directive"] == "proxy_set_header"] == []
    # Nothing hides the headers a resuming client sends.
    hidden = [d["args"] for d in walk(http_block) if d["directive"] == "proxy_hide_header"]
    assert hidden == []
    assert not [d for d in walk(http_block) if d["directive"] == "proxy_pass_request_headers"]


def test_a_dead_relay_is_skipped(http_block: list[Directive]) -> None:
    next_upstream = one(stream_location(http_block), "proxy_next_upstream")["args"]
    assert {"error", "timeout"} <= set(next_upstream)
    assert "non_idempotent" not in next_upstream
    # A 503 is the relay's answer with Retry-After, and nginx would count it as a failure.
    assert "http_503" not in next_upstream
    assert seconds(one(http_block, "proxy_connect_timeout")["args"][0]) <= 5


def test_logs_never_hold_a_token(http_block: list[Directive]) -> None:
    log_format = one(http_block, "log_format", "rapidphoto")["args"]
    text = " ".join(log_format[1:])
    for variable in (
        "$request ",
        '$request"',
        "$request_uri",
        "$args",
        "$query_string",
        "$arg_",
        "$http_cookie",
        "$cookie_",
        "$http_authorization",
        "$http_referer",
    ):
        assert variable not in text, variable
    assert "$rp_log_args" in text
    assert one(http_block, "access_log")["args"][1] == "rapidphoto"
    assert not [d for d in walk(http_block) if d["directive"] == "error_log"]


def test_error_log_level_keeps_request_lines_out(rendered: NginxServer) -> None:
    top = parse(rendered.conf)
    assert one(top, "error_log")["args"][1] == "crit"


def test_reload_does_not_wait_for_streams_to_end(rendered: NginxServer) -> None:
    """Old workers would otherwise live as long as the longest open stream after a reload."""
    top = parse(rendered.conf)
    assert seconds(one(top, "worker_shutdown_timeout")["args"][0]) <= 30


def test_tls_server_with_http2_is_documented() -> None:
    template = TEMPLATE.read_text()
    assert "#     http2 on;" in template
    assert "six connections per origin" in template.replace("\n    # ", " ")


class _Stub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("access_token=SECRET-A&lastEventId=1-0", "access_token=[redacted]&lastEventId=1-0"),
        ("a=1&access_token=SECRET-A&b=2", "a=1&access_token=[redacted]&b=2"),
        (
            "access_token=SECRET-A&access_token=SECRET-B",
            "access_token=[redacted]&access_token=[redacted]",
        ),
        ("access%5Ftoken=SECRET-A", "access%5Ftoken=[redacted]"),
        ("ACCESS_TOKEN=SECRET-A", "ACCESS_TOKEN=[redacted]"),
        ("access_token%3DSECRET-A", "access_token%3D[redacted]"),
        ("access_token=SECRET-A&x=access_token=SECRET-B&access_token=SECRET-C", "[redacted]"),
        ("lastEventId=5-0", "lastEventId=5-0"),
    ],
)
def test_access_log_redacts_the_token(
    tmp_path: Path, stub_upstream: str, query: str, logged: str
) -> None:
    nginx = NginxServer(tmp_path / "nginx", [stub_upstream]).start()
    try:
        response = httpx.get(
            f"{nginx.url}{STREAM_LOCATION}s1/stream?{query}",
            headers={"Referer": f"{nginx.url}/demo?access_token=SECRET-R&session=s1"},
        )
        assert response.status_code == 200
        wait_until(lambda: "stream" in nginx.access_log(), timeout=5, what="the access log line")
    finally:
        nginx.stop()
    log = nginx.access_log()
    assert "SECRET" not in log
    assert f"GET {STREAM_LOCATION}s1/stream?{logged} HTTP/1.1" in log
    assert f"{nginx.url}/demo?[redacted]" in log
    assert "SECRET" not in nginx.error_log()


def test_nginx_binary_is_found() -> None:
    assert Path(nginx_binary()).is_file()
