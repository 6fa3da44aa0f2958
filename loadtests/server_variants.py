"""The relay under other servers or without its direct writes, for ``capacity.py --server-cmd``.

Only for the server comparison in ``docs/performance.md``; production runs ``rapidphoto-relay``.

    # uvicorn (uvloop + httptools), every frame through ASGI send (direct writes off)
    .tools/bin/uv run python loadtests/capacity.py --label uvicorn-asgi \\
        --server-cmd "python -m loadtests.server_variants asgi-only --port {port}"

    # granian (scratch: not a dependency), one worker, single-threaded runtime, same app
    .tools/bin/uv run --with granian python loadtests/capacity.py --label granian \\
        --server-cmd "python -m granian --interface asgi --loop uvloop --workers 1 \\
            --runtime-mode st --runtime-threads 1 --backlog 4096 --backpressure 12000 \\
            --host 127.0.0.1 --port {port} --factory loadtests.server_variants:granian_app"

Both take the relay's settings from the environment as ``rapidphoto-relay`` does. Under granian
the streams fall back to ASGI ``send`` by themselves (``DirectWriter`` only knows uvicorn), and the
uvicorn-specific SIGTERM handling of ``main.py`` is missing (see the performance notes).
"""

from __future__ import annotations

import logging.config
import sys

from litestar.types import ASGIApp

from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay import direct, main
from rapidphoto_relay.logs import logging_config


def granian_app() -> ASGIApp:
    settings = RelayConfig.from_env()
    settings.require_jwt_key()
    logging.config.dictConfig(logging_config())
    return main.asgi_app(settings)


def _no_direct_writes(cls: type[direct.DirectWriter], scope: object) -> None:
    return None


def asgi_only(argv: list[str]) -> None:
    direct.DirectWriter.attach = classmethod(_no_direct_writes)  # type: ignore[method-assign,assignment]
    main.main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["asgi-only"]:
        raise SystemExit("usage: python -m loadtests.server_variants asgi-only [--port P]")
    asgi_only(sys.argv[2:])
