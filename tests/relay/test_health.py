"""The relay's other endpoints and its operational behaviour: info, health, metrics, OpenAPI, the
demo flag, CORS, start-up configuration errors, structured logs without tokens."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.relay.conftest import Relay, RelayFactory
from tests.support.processes import BIN, base_env
from tests.support.seed import Seeder
from tests.support.sse import open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


def test_info_describes_the_streams(relay: Relay) -> None:
    response = relay.get("/api/realtime/info")
    assert response.status_code == 200
    assert response.json() == {
        "sessionStreamEndpoint": "/api/upload/sessions/{sessionId}/stream",
        "notificationStreamEndpoint": "/api/upload/sessions/notifications/stream",
        "multiSessionStreamEndpoint": "/api/upload/sessions/stream",
        "protocol": "SSE",
        "messageTypes": [
            "SESSION_SNAPSHOT",
            "SESSION_STARTED",
            "PHOTO_UPLOADED",
            "PHOTO_FAILED",
            "SESSION_COMPLETED",
            "STREAM_CLOSED",
            "notification",
            "SESSION_CLOSED",
        ],
    }


def test_health_endpoints(relay: Relay) -> None:
    assert relay.get("/health/live").status_code == 200
    ready = relay.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["redis"] is True
    assert ready.json()["subscription"] is True


def test_ready_is_503_when_redis_is_unreachable(relay_factory: RelayFactory) -> None:
    relay = relay_factory(redis_url="redis://127.0.0.1:1/0", ready=False)
    response = relay.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["redis"] is False
    assert relay.get("/health/live").status_code == 200


async def test_metrics_are_prometheus_text(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "u1", 2)
    async with open_sse(
        relay.base_url, f"/api/upload/sessions/{session}/stream", token=relay.token("u1")
    ) as stream:
        await stream.next_event()
        delivered = relay.metric("rapidphoto_relay_events_delivered_total")
        await seed.upload(session, "p0")
        await stream.next_event()
        text = relay.get("/metrics").text
        assert relay.metric("rapidphoto_relay_events_delivered_total") == delivered + 1
        assert relay.metric("rapidphoto_relay_open_streams", 'kind="session"') >= 1
        assert relay.metric("rapidphoto_relay_subscribed_channels") >= 1
    for name in (
        "rapidphoto_relay_events_dropped_total",
        "rapidphoto_relay_slow_consumer_closes_total",
        "rapidphoto_relay_auth_failures_total",
        "rapidphoto_relay_redis_reconnects_total",
        "rapidphoto_relay_delivery_lag_seconds_bucket",
    ):
        assert name in text
    assert relay.metric("rapidphoto_relay_delivery_lag_seconds_count") >= 1


def test_openapi_documents_the_endpoints(relay: Relay) -> None:
    schema = relay.get("/schema/openapi.json").json()
    assert "/api/upload/sessions/{sessionId}/stream" in schema["paths"]
    assert "/api/upload/sessions/notifications/stream" in schema["paths"]
    assert "/api/realtime/info" in schema["paths"]


def test_unknown_paths_are_404_json(relay: Relay) -> None:
    response = relay.get("/nope")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_demo_is_404_unless_enabled(relay: Relay, relay_factory: RelayFactory) -> None:
    assert relay.get("/demo").status_code == 404
    demo = relay_factory(RELAY_DEMO="1")
    response = demo.get("/demo")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


async def test_cors_allows_configured_origins_with_credentials(relay_factory: RelayFactory) -> None:
    """Regression: CORS middleware appended its headers to our shared header list in place, so
    every later stream, whatever its Origin, carried the first origin's allow headers."""
    relay = relay_factory(RELAY_CORS_ORIGINS="https://app.example, https://other.example")
    async with httpx.AsyncClient() as client:
        preflight = await client.options(
            relay.base_url + NOTIFICATIONS,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, last-event-id",
            },
        )
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    async with open_sse(
        relay.base_url,
        NOTIFICATIONS,
        token=relay.token("u1"),
        headers={"Origin": "https://app.example"},
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == "https://app.example"
        assert stream.headers["access-control-allow-credentials"] == "true"
    async with open_sse(
        relay.base_url,
        NOTIFICATIONS,
        token=relay.token("u1"),
        headers={"Origin": "https://evil.example"},
    ) as stream:
        assert "access-control-allow-origin" not in stream.headers
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("u1")) as stream:
        assert "access-control-allow-origin" not in stream.headers


def test_start_up_without_a_key_exits_naming_the_variable(relay: Relay) -> None:
    done = subprocess.run(
        [str(BIN / "rapidphoto-relay"), "--port", "1"],
        env=base_env(relay.redis_url),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "JWT_SECRET" in done.stderr


def test_invalid_setting_exits_naming_the_variable(relay: Relay) -> None:
    done = subprocess.run(
        [str(BIN / "rapidphoto-relay"), "--port", "1"],
        env=base_env(relay.redis_url, JWT_SECRET="x" * 40, SSE_BUFFER_EVENTS="lots"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "SSE_BUFFER_EVENTS" in done.stderr


async def test_logs_are_json_lines_with_stream_open_and_close_and_never_the_token(
    relay_factory: RelayFactory, log_dir: Path
) -> None:
    relay = relay_factory()
    token = relay.token("u-logged")
    bad = relay.token("u-logged", ttl=-5)
    async with open_sse(relay.base_url, NOTIFICATIONS, token=token, via="query") as stream:
        await stream.next_frame()
    async with open_sse(relay.base_url, NOTIFICATIONS, token=bad, via="query") as refused:
        assert refused.status_code == 401
    async with open_sse(
        relay.base_url, "/api/upload/sessions/a:b/stream", token=token, via="query"
    ):
        pass
    relay.proc.stop()
    text = relay.proc.log()
    assert token not in text
    assert bad not in text
    assert "access_token=[REDACTED]" in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(lines) == len([line for line in text.splitlines() if line.strip()])
    opened = [line for line in lines if line["msg"] == "stream opened"]
    closed = [line for line in lines if line["msg"] == "stream closed"]
    assert opened[0]["user"] == "u-logged"
    assert opened[0]["channel"] == "user-notifications:u-logged"
    assert closed[0]["reason"] == "disconnected"
    assert closed[0]["duration_s"] >= 0
