"""The nginx template (deploy/nginx/): it renders, ``nginx -t`` accepts it, and it says what SSE needs.

The behaviour behind a real relay (unbuffered delivery, fail-over, redaction end to end) is in
tests/e2e/test_nginx.py; here the file itself is checked, plus the log redaction against a stub
upstream, which needs no relay.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
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

from rapidphoto_contract.settings import RelayConfig
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
    assert read_timeout >= 3600 > 4 * RelayConfig().sse_heartbeat_seconds


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
    assert {"error", "timeout", "http_503"} <= set(next_upstream)
    assert "non_idempotent" not in next_upstream
    assert "http_429" not in next_upstream
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


class StubRelay(http.server.ThreadingHTTPServer):
    """A stand-in relay on a free port that answers every request with ``status``, counting them."""

    def __init__(self, status: int = 200) -> None:
        super().__init__(("127.0.0.1", free_port()), _StubHandler)
        self.status = status
        self.hits = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _StubHandler(http.server.BaseHTTPRequestHandler):
    server: StubRelay
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits += 1
        body = b"{}" if self.server.status == 200 else b'{"error": "too many streams"}'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.status == 503:
            self.send_header("Retry-After", "7")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub_relays() -> Iterator[Callable[..., list[StubRelay]]]:
    made: list[StubRelay] = []

    def make(*statuses: int) -> list[StubRelay]:
        stubs = [StubRelay(status) for status in statuses]
        made.extend(stubs)
        return stubs

    yield make
    for stub in made:
        stub.close()


@pytest.fixture
def stub_upstream(stub_relays: Callable[..., list[StubRelay]]) -> str:
    return stub_relays(200)[0].address


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, addresses: list[str]) -> Iterator[NginxServer]:
    nginx = NginxServer(tmp_path / "nginx", addresses).start()
    try:
        yield nginx
    finally:
        nginx.stop()


def test_a_busy_or_dead_relay_is_skipped(
    tmp_path: Path, stub_relays: Callable[..., list[StubRelay]]
) -> None:
    busy, healthy = stub_relays(503, 200)
    dead = f"127.0.0.1:{free_port()}"
    with nginx_in_front(tmp_path, [busy.address, dead, healthy.address]) as nginx:
        for _ in range(6):
            response = httpx.get(f"{nginx.url}{STREAM_LOCATION}s1/stream")
            assert response.status_code == 200
    assert busy.hits == 1  # tried once, then left out for fail_timeout
    assert healthy.hits == 6


def test_every_relay_busy_gives_the_client_a_503_with_retry_after(
    tmp_path: Path, stub_relays: Callable[..., list[StubRelay]]
) -> None:
    relays = stub_relays(503, 503)
    with nginx_in_front(tmp_path, [r.address for r in relays]) as nginx:
        first = httpx.get(f"{nginx.url}{STREAM_LOCATION}s1/stream")
        # The relays' own answer, from the last one tried.
        assert first.status_code == 503
        assert first.headers["retry-after"] == "7"
        assert sum(r.hits for r in relays) == 2
        # Later requests, with one or both left out, still get a 503 to retry after (the relay's
        # own, or nginx's in the same shape), never a bare 502.
        for _ in range(3):
            later = httpx.get(f"{nginx.url}{STREAM_LOCATION}s1/stream")
            assert later.status_code == 503
            assert int(later.headers["retry-after"]) >= 1
            assert "error" in later.json()


def test_no_relay_listening_gives_a_503_with_retry_after(tmp_path: Path) -> None:
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with nginx_in_front(tmp_path, addresses) as nginx:
        for path in (f"{STREAM_LOCATION}s1/stream", "/api/realtime/info"):
            response = httpx.get(nginx.url + path)
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert "error" in response.json()


def test_readiness_503_is_passed_through_not_retried(
    tmp_path: Path, stub_relays: Callable[..., list[StubRelay]]
) -> None:
    """/health/ready is 503 while Redis is away; that must reach the prober, not mark relays down."""
    relays = stub_relays(503, 503)
    with nginx_in_front(tmp_path, [r.address for r in relays]) as nginx:
        for expected_hits in (1, 2, 3):
            response = httpx.get(f"{nginx.url}/health/ready")
            assert response.status_code == 503
            assert response.headers["retry-after"] == "7"
            assert sum(r.hits for r in relays) == expected_hits


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
    with nginx_in_front(tmp_path, [stub_upstream]) as nginx:
        response = httpx.get(
            f"{nginx.url}{STREAM_LOCATION}s1/stream?{query}",
            headers={"Referer": f"{nginx.url}/demo?access_token=SECRET-R&session=s1"},
        )
        assert response.status_code == 200
        wait_until(lambda: "stream" in nginx.access_log(), timeout=5, what="the access log line")
    log = nginx.access_log()
    assert "SECRET" not in log
    assert f"GET {STREAM_LOCATION}s1/stream?{logged} HTTP/1.1" in log
    assert f"{nginx.url}/demo?[redacted]" in log
    assert "SECRET" not in nginx.error_log()


def test_nginx_binary_is_found() -> None:
    assert Path(nginx_binary()).is_file()
