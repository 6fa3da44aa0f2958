"""``rapidphoto-relay``: serve the relay with uvicorn (uvloop + httptools).

Settings come from the environment once, here (CONVENTIONS §4); ``--host``/``--port`` override
``RELAY_HOST``/``RELAY_PORT``. A missing or invalid variable exits with a message naming it.

Shutdown: uvicorn waits for open responses to finish before it runs the lifespan shutdown, and an
SSE response never finishes by itself, so on SIGTERM/SIGINT :class:`RelayServer` first tells every
stream to close (``STREAM_CLOSED shutdown``, PROTOCOL §5) and only then lets uvicorn proceed.

Before serving, :func:`~rapidphoto_relay.uvicorn_seam.check_uvicorn` verifies the private parts of
uvicorn the relay uses; what the installed uvicorn lacks is turned off with a WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging.config
import signal
import socket
import sys
from types import FrameType
from typing import Final, Literal

import attrs
import uvicorn
from litestar import Litestar
from litestar.types import ASGIApp

from rapidphoto_contract.settings import ConfigError, RelayConfig, parse_relay_workers
from rapidphoto_relay.app import SERVICES_STATE_KEY, create_app
from rapidphoto_relay.connections import (
    FD_RESERVE,
    HeadDeadlineProtocol,
    PendingConnections,
    protocol_class,
    raise_open_files_limit,
)
from rapidphoto_relay.direct import ServerSendCapture
from rapidphoto_relay.fast_path import StreamFastPath
from rapidphoto_relay.headers import HeaderSizeLimit
from rapidphoto_relay.logs import lean_records, logging_config
from rapidphoto_relay.services import RelayServices
from rapidphoto_relay.supervisor import Supervisor, listening_socket
from rapidphoto_relay.uvicorn_seam import UvicornSeam, check_uvicorn

#: PROTOCOL §5: all streams closed within 5 s of SIGTERM; uvicorn's own deadline is the backstop.
SHUTDOWN_SECONDS: Final = 4.0


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_task: asyncio.Future[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything built so far (modules, the app, the services) lives as long as the process:
        # out of the collector's sight, it no longer makes every full collection ~40 ms longer.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between bytecodes of whatever the loop was doing: only schedule.
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._close_streams)
        super().handle_exit(sig, frame)

    def _close_streams(self) -> None:
        services = self._app.state.get(SERVICES_STATE_KEY)
        if isinstance(services, RelayServices):
            self._shutdown_task = asyncio.ensure_future(
                services.registry.shutdown(SHUTDOWN_SECONDS - 0.5)
            )


def asgi_app(settings: RelayConfig) -> ASGIApp:
    """What uvicorn serves: the Litestar app behind the layers that must come first."""
    return _outer_layers(create_app(settings))


def _outer_layers(app: Litestar) -> ASGIApp:
    # Outermost, so the streams can find uvicorn's connection for direct writes (direct.py);
    # then the header size limit, before routing and authentication (headers.py); then the
    # stream routes' direct path, which leaves everything else to Litestar (fast_path.py).
    return ServerSendCapture(HeaderSizeLimit(StreamFastPath(app)))


def http_protocol(
    seam: UvicornSeam, pending: PendingConnections
) -> type[HeadDeadlineProtocol] | Literal["httptools"]:
    """uvicorn's httptools protocol with the head deadline (connections.py), or the stock one
    when the installed uvicorn lacks what it extends."""
    return protocol_class(pending) if seam.head_deadline else "httptools"


def _workers_argument(raw: str) -> int:
    try:
        return parse_relay_workers({"RELAY_WORKERS": raw}, "RELAY_WORKERS")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rapidphoto-relay", description="Serve RapidPhoto's SSE relay (PROTOCOL §5)."
    )
    parser.add_argument("--host", help="listen address (overrides RELAY_HOST)")
    parser.add_argument("--port", type=int, help="listen port (overrides RELAY_PORT)")
    parser.add_argument(
        "--workers",
        type=_workers_argument,
        help="relay processes on the port, N or 'auto' (one per CPU; overrides RELAY_WORKERS)",
    )
    # Set by the supervisor for its processes (supervisor.py): bind with SO_REUSEPORT.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = RelayConfig.from_env()
        settings.require_jwt_key()
    except ConfigError as exc:
        print(f"rapidphoto-relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.host:
        settings = attrs.evolve(settings, relay_host=args.host)
    if args.port is not None:
        settings = attrs.evolve(settings, relay_port=args.port)
    if args.workers is not None:
        settings = attrs.evolve(settings, relay_workers=args.workers)
    # Before anything logs (uvicorn.Config applies the same configuration again).
    lean_records()
    logging.config.dictConfig(logging_config())
    if settings.relay_workers > 1:
        supervisor = Supervisor(settings.relay_host, settings.relay_port, settings.relay_workers)
        status = supervisor.run()
        if status == 0 and supervisor.stopped_by is not None:
            # As a single relay does (uvicorn re-raises the signal it stopped on).
            signal.signal(supervisor.stopped_by, signal.SIG_DFL)
            signal.raise_signal(supervisor.stopped_by)
        raise SystemExit(status)
    sockets = (
        [listening_socket(settings.relay_host, settings.relay_port, reuse_port=True)]
        if args.reuse_port
        else None
    )
    seam = check_uvicorn()
    app = create_app(settings)
    # Connections that have not sent a whole request head yet: deadline and cap (connections.py).
    pending = PendingConnections(
        head_timeout=settings.relay_request_head_timeout_seconds,
        limit=settings.relay_max_pending_connections,
        metrics=app.state["metrics"],
    )
    config = uvicorn.Config(
        _outer_layers(app),
        host=settings.relay_host,
        port=settings.relay_port,
        loop="uvloop",
        http=http_protocol(seam, pending),  # uvicorn's httptools protocol, extended
        lifespan="on",
        log_config=logging_config(),
        access_log=True,
        timeout_graceful_shutdown=int(SHUTDOWN_SECONDS),
        # Many idle streams: keep per-connection defaults; no request limit, no reload.
        # (No limit_concurrency: it would answer 503 to requests once that many connections are
        # open, streams included; RELAY_MAX_CONNECTIONS and the pending cap do that job.)
        backlog=4096,
        # uvicorn's default, stated: an idle keep-alive connection is closed 5 s after a response
        # if no byte came. Its timer stops at the first byte; the head deadline (also counted from
        # the end of the response) does not, so a half-sent next head is closed too.
        timeout_keep_alive=5,
    )
    # After Config: it has set up logging.
    raise_open_files_limit(
        settings.relay_max_connections + settings.relay_max_pending_connections + FD_RESERVE
    )
    RelayServer(config, app).run(sockets)


if __name__ == "__main__":
    main()
