"""The stream routes' direct path: ``GET`` of a session or notification stream without Litestar's
per-request machinery.

A stream is opened thousands of times a second in a reconnection storm, and for each open
Litestar routes the path, runs the exception middleware, the guard, builds the handler's signature
model and its dependencies, then a response object: ~14 % of a stream open's CPU in the storm
profiles (``loadtests/results/storm``). This ASGI layer, in front of the Litestar app, does for
exactly these two routes what that machinery amounts to, and calls the *same* handler functions
(``streams.session_stream`` and ``streams.notification_stream``, undecorated) with the same
arguments:

- the path is ``/api/upload/sessions/notifications/stream``, or ``/api/upload/sessions/{id}/stream``
  with a valid id (any other id goes to Litestar, which answers 400 as before);
- authentication is the guard's own :meth:`Authenticator.authenticate`, on a Litestar ``Request``;
- ``lastEventId`` (query) and ``Last-Event-ID`` (header) are read as Litestar's parameters read
  them (the first value);
- the handler's errors become the app's own error responses (``_relay_error``, ``_unexpected``).

Everything else goes to Litestar unchanged: other paths and methods, and any request with an
``Origin`` header (a browser's cross-origin request, which the CORS middleware must see). Litestar
keeps the routes, their OpenAPI document and every other endpoint. The two paths give the same
answers: ``tests/relay/test_fast_path.py`` sends each request both ways and compares.
"""

from __future__ import annotations

import logging
from typing import Any, Final, cast

from litestar import Litestar, Request, Response
from litestar.enums import ScopeType
from litestar.types import Receive, Scope, Send

from rapidphoto_contract.ids import RESERVED_SESSION_IDS, is_valid_id
from rapidphoto_relay import streams
from rapidphoto_relay.app import _services
from rapidphoto_relay.auth import PRINCIPAL_STATE_KEY, Authenticator
from rapidphoto_relay.errors import RelayHTTPError

logger = logging.getLogger(__name__)

_PREFIX: Final = "/api/upload/sessions/"
_SUFFIX: Final = "/stream"


def stream_route(scope: Scope) -> str | None:
    """``"notifications"``, the session id, or ``None`` when the request is not for this path."""
    if scope["type"] != ScopeType.HTTP or scope["method"] != "GET":
        return None
    path: str = scope["path"]
    if path == streams.NOTIFICATION_STREAM_PATH:
        route = "notifications"
    elif path.startswith(_PREFIX) and path.endswith(_SUFFIX):
        route = path[len(_PREFIX) : -len(_SUFFIX)]
        if not is_valid_id(route) or route in RESERVED_SESSION_IDS:
            return None  # not an id (or a slash in it): Litestar's 400 or 404
    else:
        return None
    for name, _ in scope["headers"]:
        if name == b"origin":
            return None  # for the CORS middleware
    return route


class StreamFastPath:
    """ASGI layer: the two stream routes served directly, the rest by ``app`` (see the module)."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self._authenticator: Authenticator = app.state["authenticator"]
        self._session = streams.session_stream.fn
        self._notifications = streams.notification_stream.fn
        self.served = 0  # requests this path answered (tests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = stream_route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        self.served += 1
        cast("dict[str, Any]", scope)["litestar_app"] = self.app  # as Litestar's entry point does
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        try:
            response = await self._answer(request, route)
        except RelayHTTPError as exc:
            response = Response(
                {"error": exc.message}, status_code=exc.status_code, headers=exc.headers
            )
        except Exception:
            logger.exception("stream request failed")
            response = Response({"error": "internal error"}, status_code=500)
        if isinstance(response, streams.StreamResponse):
            await response.stream(scope, receive, send)
            return
        await response.to_asgi_response(self.app, request)(scope, receive, send)

    async def _answer(self, request: Request[Any, Any, Any], route: str) -> Response[Any]:
        request.state[PRINCIPAL_STATE_KEY] = self._authenticator.authenticate(request)
        services = _services(self.app.state)
        query = request.query_params.get("lastEventId")
        header = request.headers.get("last-event-id")
        if route == "notifications":
            response = await self._notifications(request, services, query, header)
        else:
            response = await self._session(request, route, services, query, header)
        assert isinstance(response, Response)
        return response
