"""A limit on the size of a request's headers (PROTOCOL §7, "oversized headers": a clear error).

uvicorn's httptools protocol reads headers of any size (a 2 MB header is parsed, then handed to
the app), so the limit is enforced here, in front of everything else: before routing, before the
token is looked for in a header or a cookie. Over the limit the answer is ``431 Request Header
Fields Too Large`` (RFC 6585 §5) with the usual ``{"error": ...}`` body, and the connection is
closed. 16 KiB is what Node.js allows by default and half of nginx's default (4 buffers of 8 KiB),
far above any real browser request to this API.
"""

from __future__ import annotations

import json
from typing import Final

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

#: Request header bytes allowed: names, values and the ": " and CRLF around each.
MAX_HEADER_BYTES: Final = 16 * 1024

_BODY: Final = json.dumps(
    {"error": f"request headers too large (at most {MAX_HEADER_BYTES} bytes)"}
).encode()


def header_bytes(scope: Scope) -> int:
    return sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class HeaderSizeLimit:
    """ASGI middleware answering 431 to requests whose headers exceed ``MAX_HEADER_BYTES``."""

    def __init__(self, app: ASGIApp, limit: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and header_bytes(scope) > self.limit:
            await send(
                {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_BODY)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _BODY, "more_body": False})
            return
        await self.app(scope, receive, send)
