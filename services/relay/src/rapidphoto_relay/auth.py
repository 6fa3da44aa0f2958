"""Authentication of stream requests (PROTOCOL §5), as a Litestar guard.

Guards run before a handler's parameters are parsed, so an unauthenticated request gets its 401
before anything about its path or session id is checked (401 before 400/403).

The token comes from the first source present, in this order: ``Authorization: Bearer``, the
``JWT_COOKIE_NAME`` cookie, the ``access_token`` query parameter (browsers' EventSource cannot set
headers). "First present decides": an invalid header token is refused even if a valid cookie is
also sent, so a client never gets a different identity than the one it put first.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import Reference, SecurityRequirement, SecurityScheme

from rapidphoto_contract.tokens import InvalidToken, Principal, TokenVerifier
from rapidphoto_relay.errors import Unauthorized
from rapidphoto_relay.metrics import RelayMetrics

#: Query parameter for EventSource clients; redacted from every log line (see ``logs.py``).
QUERY_PARAMETER: Final = "access_token"
#: Where the guard leaves the caller for the handler, in the connection's scope state.
PRINCIPAL_STATE_KEY: Final = "principal"

TokenSource: TypeAlias = Literal["header", "cookie", "query"]

#: The token sources in the OpenAPI document, as alternatives (any one of them authenticates).
SECURITY: Final[list[SecurityRequirement]] = [
    {"bearerToken": []},
    {"tokenCookie": []},
    {"tokenQuery": []},
]


def security_schemes(cookie_name: str) -> dict[str, SecurityScheme | Reference]:
    """The schemes named by :data:`SECURITY` (the cookie's name is a setting)."""
    return {
        "bearerToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
        "tokenCookie": SecurityScheme(type="apiKey", name=cookie_name, security_scheme_in="cookie"),
        "tokenQuery": SecurityScheme(
            type="apiKey",
            name=QUERY_PARAMETER,
            security_scheme_in="query",
            description="for EventSource, which cannot send headers; redacted from the logs",
        ),
    }


def find_token(connection: ASGIConnection, cookie_name: str) -> tuple[TokenSource, str] | None:  # type: ignore[type-arg]
    """The token and where it came from, by PROTOCOL §5's order; ``None`` if no source is present."""
    header = connection.headers.get("authorization")
    if header is not None:
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return "header", credentials.strip()
    cookie = connection.cookies.get(cookie_name)
    if cookie is not None:
        return "cookie", cookie
    query = connection.query_params.get(QUERY_PARAMETER)
    if query is not None:
        return "query", query
    return None


class Authenticator:
    """Verifies the request's token; one per app, holding the verifier and the metrics."""

    def __init__(self, verifier: TokenVerifier, cookie_name: str, metrics: RelayMetrics) -> None:
        self._verifier = verifier
        self._cookie_name = cookie_name
        self._metrics = metrics

    def authenticate(self, connection: ASGIConnection) -> Principal:  # type: ignore[type-arg]
        found = find_token(connection, self._cookie_name)
        if found is None:
            self._metrics.auth_failures.labels("missing").inc()
            raise Unauthorized("authentication required: send a bearer token", invalid=False)
        _, token = found
        try:
            return self._verifier.verify(token)
        except InvalidToken as exc:
            self._metrics.auth_failures.labels(exc.reason).inc()
            raise Unauthorized(str(exc), invalid=True) from None


async def authenticated(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """The guard: authenticate, and leave the :class:`Principal` in the connection state."""
    authenticator: Authenticator = connection.app.state["authenticator"]
    connection.state[PRINCIPAL_STATE_KEY] = authenticator.authenticate(connection)


def principal_of(connection: ASGIConnection) -> Principal:  # type: ignore[type-arg]
    principal = connection.state.get(PRINCIPAL_STATE_KEY)
    if not isinstance(principal, Principal):
        raise RuntimeError("stream handler reached without the authentication guard")
    return principal
