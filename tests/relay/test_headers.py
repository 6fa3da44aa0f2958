"""PROTOCOL §7, oversized headers: 431 with a JSON error over real HTTP, and everyone else served."""

from __future__ import annotations

import asyncio
import json

import pytest

from rapidphoto_relay.headers import MAX_HEADER_BYTES
from tests.relay.conftest import Relay

NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


async def _raw_get(relay: Relay, path: str, headers: dict[str, str]) -> tuple[int, bytes, bytes]:
    """One request on a raw socket (an HTTP library may refuse to send what we want to send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(head.split(b" ", 2)[1]), head.lower(), body
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        # one huge header, before authentication: the token is never looked at
        (NOTIFICATIONS, {"Authorization": "Bearer " + "a" * 2_000_000}),
        (NOTIFICATIONS, {"Cookie": "access_token=" + "b" * (MAX_HEADER_BYTES + 1)}),
        # many small ones add up; and any path, even one that does not exist
        ("/nowhere", {f"X-Pad-{n}": "c" * 200 for n in range(100)}),
        ("/health/live", {"X-Pad": "d" * MAX_HEADER_BYTES}),
    ],
    ids=["2MB-authorization", "big-cookie", "many-headers", "just-over"],
)
async def test_oversized_headers_get_431_json(
    relay: Relay, path: str, headers: dict[str, str]
) -> None:
    status, head, body = await _raw_get(relay, path, headers)
    assert status == 431
    assert b"content-type: application/json" in head
    assert b"connection: close" in head
    assert json.loads(body) == {
        "error": f"request headers too large (at most {MAX_HEADER_BYTES} bytes)"
    }
    # and the relay goes on serving everyone else
    assert relay.get("/health/live").status_code == 200


async def test_headers_just_under_the_limit_are_served(relay: Relay) -> None:
    status, _, body = await _raw_get(relay, "/health/live", {"X-Pad": "e" * 15_000})
    assert status == 200
    assert json.loads(body) == {"status": "ok"}
