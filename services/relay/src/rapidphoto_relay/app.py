"""``create_app(settings)``: the relay's routes, lifespan, dependencies and error format."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from rapidphoto_contract.settings import RelayConfig
from rapidphoto_contract.tokens import TokenVerifier
from rapidphoto_relay import health, streams
from rapidphoto_relay.auth import Authenticator, security_schemes
from rapidphoto_relay.errors import RelayHTTPError
from rapidphoto_relay.loop_lag import LoopLagMonitor
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.services import RelayServices, open_services

#: State key of the per-process services, set by the lifespan.
SERVICES_STATE_KEY = "relay_services"


def _services(state: State) -> RelayServices:
    services = state.get(SERVICES_STATE_KEY)
    if not isinstance(services, RelayServices):
        raise RuntimeError("relay services are not running (lifespan did not start)")
    return services


def _relay_error(_: Request[Any, Any, Any], exc: RelayHTTPError) -> Response[dict[str, str]]:
    return Response({"error": exc.message}, status_code=exc.status_code, headers=exc.headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    # Litestar's own errors (404, 405, parameter validation) in the same {"error": ...} shape.
    # A validation error's detail quotes the whole URL, query string included, and so would echo
    # an ``access_token`` (PROTOCOL §5: error bodies never echo the token): name the parameters
    # instead, never their values.
    message = str(exc.detail)
    if isinstance(exc, ValidationException):
        names = sorted(
            {str(item.get("key")) for item in exc.extra or [] if isinstance(item, dict)} - {"None"}
        )
        message = "invalid request parameters" + (f": {', '.join(names)}" if names else "")
    return Response({"error": message}, status_code=exc.status_code, headers=exc.headers or None)


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    return Response({"error": "internal error"}, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


@get("/metrics", summary="Prometheus metrics", tags=["health"], media_type=MediaType.TEXT)
async def metrics_endpoint(state: State) -> Response[bytes]:
    metrics: RelayMetrics = state["metrics"]
    return Response(metrics.render(), media_type=metrics.content_type)


#: The live progress page (PROTOCOL §8), shipped inside the package.
DEMO_PAGE_RESOURCE = "static/demo.html"
#: The page's URL carries the user's token: never cache it, never send it on as a Referer.
_DEMO_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def load_demo_page() -> bytes:
    return resources.files("rapidphoto_relay").joinpath(DEMO_PAGE_RESOURCE).read_bytes()


#: The browser module (PROTOCOL §5 "Writing a client"), shipped inside the package and served by
#: every relay, so a page imports the client that matches the relay it talks to.
CLIENT_MODULE_RESOURCE = "static/rapidphoto-realtime.js"
CLIENT_MODULE_PATH = "/client/rapidphoto-realtime.js"


class ClientModule:
    """The module's bytes and validator, read once at start-up (a missing file fails the start).

    Served ``Cache-Control: no-cache`` with an ``ETag``: browsers keep it but revalidate each use
    (a 304 without body), so a page never runs a module older than the relay it talks to after an
    upgrade. ``Access-Control-Allow-Origin: *``: it is public code, and a page on another origin
    imports it as a module script, which browsers fetch in CORS mode without credentials.
    """

    def __init__(self) -> None:
        self.body = (
            resources.files("rapidphoto_relay").joinpath(CLIENT_MODULE_RESOURCE).read_bytes()
        )
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        self.headers = {
            "Cache-Control": "no-cache",
            "ETag": self.etag,
            "X-Content-Type-Options": "nosniff",
            "Access-Control-Allow-Origin": "*",
            "Cross-Origin-Resource-Policy": "cross-origin",
        }

    def matches(self, if_none_match: str | None) -> bool:
        """RFC 9110 §13.1.2: weak comparison against each listed tag, or ``*``."""
        if not if_none_match:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


@get(
    CLIENT_MODULE_PATH,
    summary="The browser client (an ES module)",
    tags=["client"],
    media_type="text/javascript",
)
async def client_module(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    module: ClientModule = state["client_module"]
    if module.matches(request.headers.get("if-none-match")):
        return Response(b"", status_code=304, headers=module.headers)
    return Response(module.body, media_type="text/javascript", headers=module.headers)


@get("/demo", summary="Live progress page (RELAY_DEMO=1)", tags=["demo"], media_type=MediaType.HTML)
async def demo(state: State) -> Response[bytes]:
    page: bytes = state["demo_page"]
    return Response(page, media_type=MediaType.HTML, headers=_DEMO_HEADERS)


def create_app(settings: RelayConfig) -> Litestar:
    """The relay app; ``settings`` is built once by the entrypoint (CONVENTIONS §4)."""
    metrics = RelayMetrics()
    authenticator = Authenticator(TokenVerifier(settings), settings.jwt_cookie_name, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with LoopLagMonitor(metrics.loop_lag), open_services(settings, metrics) as services:
            app.state[SERVICES_STATE_KEY] = services
            try:
                yield
            finally:
                # Normally empty by now (the server closed them on SIGTERM); this is the backstop.
                await services.registry.shutdown(within=2.0)
                del app.state[SERVICES_STATE_KEY]

    cors = (
        CORSConfig(
            allow_origins=list(settings.relay_cors_origins),
            allow_credentials=True,
            allow_methods=["GET", "OPTIONS"],
            allow_headers=["Authorization", "Last-Event-ID", "Cache-Control"],
            expose_headers=["Retry-After"],
        )
        if settings.relay_cors_origins
        else None
    )
    handlers: list[Any] = [
        streams.notification_stream,
        streams.session_stream,
        streams.multi_session_stream,
        health.live,
        health.ready,
        health.info,
        metrics_endpoint,
        client_module,
    ]
    state = State(
        {
            "authenticator": authenticator,
            "metrics": metrics,
            "settings": settings,
            "client_module": ClientModule(),
        }
    )
    if settings.relay_demo:
        # Read once at start-up: a missing page fails the start, not the first request.
        state["demo_page"] = load_demo_page()
        handlers.append(demo)
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        state=state,
        exception_handlers={
            RelayHTTPError: _relay_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        cors_config=cors,
        openapi_config=OpenAPIConfig(
            title="RapidPhoto relay",
            version="0.1.0",
            description="Authenticated Server-Sent Events of upload progress (PROTOCOL §5).",
            path="/schema",
            components=Components(security_schemes=security_schemes(settings.jwt_cookie_name)),
        ),
        logging_config=None,
    )
