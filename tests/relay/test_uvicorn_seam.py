"""The start-up check of uvicorn's private parts (``rapidphoto_relay.uvicorn_seam``).

On the installed uvicorn everything the relay reads is there; with a part missing (simulated
in-process: a request-cycle class without ``disconnected``, a protocol without
``on_response_complete``) the check says which, loudly, and the relay falls back to the plain ASGI
path and uvicorn's stock protocol instead of failing on the first stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from litestar.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl

from rapidphoto_relay.connections import HeadDeadlineProtocol, PendingConnections
from rapidphoto_relay.direct import DirectWriter, ServerSendCapture
from rapidphoto_relay.main import http_protocol
from rapidphoto_relay.uvicorn_seam import check_uvicorn
from tests.relay.test_direct import _uvicorn

SEAM_LOGGER = "rapidphoto_relay.uvicorn_seam"


@pytest.fixture(autouse=True)
def _restore_direct_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DirectWriter, "enabled", True)  # whatever a test does, undone after it


def test_the_installed_uvicorn_has_everything_the_relay_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=SEAM_LOGGER):
        seam = check_uvicorn()
    assert seam.missing == ()
    assert seam.direct_writes
    assert seam.head_deadline
    assert DirectWriter.enabled
    assert caplog.records == []
    protocol = http_protocol(seam, PendingConnections(head_timeout=5, limit=10))
    assert isinstance(protocol, type)
    assert issubclass(protocol, HeadDeadlineProtocol)


class _CycleWithoutDisconnected:
    """A request cycle as a uvicorn that renamed ``disconnected`` would have it."""

    def __init__(self, transport: Any, flow: Any) -> None:
        self.transport = transport
        self.flow = flow
        self.chunked_encoding: bool | None = None

    async def send(self, message: Any) -> None: ...


async def test_a_missing_attribute_turns_direct_writes_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger=SEAM_LOGGER):
        patched.setattr(httptools_impl, "RequestResponseCycle", _CycleWithoutDisconnected)
        seam = check_uvicorn()
    assert seam.missing == ("RequestResponseCycle.disconnected",)
    assert not seam.direct_writes
    assert seam.head_deadline
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert "RequestResponseCycle.disconnected" in warning.getMessage()
    assert "ASGI send" in warning.getMessage()

    # The fallback, on the real uvicorn (restored above): no stream gets a direct writer, and the
    # response goes through ASGI send as usual.
    attached: list[DirectWriter | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        attached.append(DirectWriter.attach(scope))
        await send({"type": "http.response.body", "body": b"via asgi\n", "more_body": False})

    async with _uvicorn(ServerSendCapture(app)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert response.endswith(b"via asgi\n\r\n0\r\n\r\n")
    assert attached == [None]


def test_a_missing_protocol_method_serves_with_the_stock_protocol(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger=SEAM_LOGGER):
        patched.delattr(httptools_impl.HttpToolsProtocol, "on_response_complete")
        seam = check_uvicorn()
    assert seam.missing == ("HttpToolsProtocol.on_response_complete()",)
    assert seam.direct_writes
    assert not seam.head_deadline
    [warning] = caplog.records
    assert "HttpToolsProtocol.on_response_complete()" in warning.getMessage()
    assert http_protocol(seam, PendingConnections(head_timeout=5, limit=10)) == "httptools"
