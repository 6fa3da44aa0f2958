"""The private parts of uvicorn the relay relies on, checked once at start-up.

Two features reach below uvicorn's public interface:

- direct writes (``direct.py``) take a request cycle of the httptools protocol
  (``RequestResponseCycle``) from its bound ``send`` and read its ``transport``, ``flow``
  (``FlowControl.write_paused``), ``disconnected`` and ``chunked_encoding``;
- the request-head deadline (``connections.py``) subclasses ``HttpToolsProtocol``, extends
  ``connection_made``, ``connection_lost``, ``on_message_begin``, ``on_headers_complete`` and
  ``on_response_complete``, and reads ``pipeline``, ``transport`` and ``loop``.

``services/relay/pyproject.toml`` pins uvicorn to the minor version these are written against, and
:func:`check_uvicorn` verifies them on the installed one anyway (a pin can be overridden). A feature
whose parts are missing is turned off with a WARNING naming them: direct writes fall back to the
ASGI ``send`` (same bytes, slower), the head deadline to uvicorn's stock httptools protocol (no
deadline, no cap on waiting connections). The relay keeps serving instead of crashing on the first
stream or being silently slow.

Instance attributes cannot be seen on a class, so the check looks for them among the names the
class's ``__init__`` (or ``connection_made``) stores: what uvicorn 0.54 does.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Final

import attrs

from rapidphoto_relay.direct import HTTPTOOLS_MODULE, DirectWriter

log = logging.getLogger("rapidphoto_relay.uvicorn_seam")

#: ``(class, method whose code stores them, attribute names)`` direct writes read.
_DIRECT_WRITE_ATTRIBUTES: Final = (
    ("RequestResponseCycle", "__init__", ("transport", "flow", "disconnected", "chunked_encoding")),
    ("FlowControl", "__init__", ("write_paused",)),
)
_DIRECT_WRITE_METHODS: Final = (("RequestResponseCycle", "send"),)
#: The same for ``connections.HeadDeadlineProtocol``.
_HEAD_DEADLINE_ATTRIBUTES: Final = (
    ("HttpToolsProtocol", "__init__", ("pipeline", "loop")),
    ("HttpToolsProtocol", "connection_made", ("transport",)),
)
_HEAD_DEADLINE_METHODS: Final = tuple(
    ("HttpToolsProtocol", name)
    for name in (
        "connection_made",
        "connection_lost",
        "on_message_begin",
        "on_headers_complete",
        "on_response_complete",
    )
)


@attrs.frozen
class UvicornSeam:
    """What :func:`check_uvicorn` found: which features may use uvicorn's private parts."""

    direct_writes: bool
    head_deadline: bool
    #: ``Class.attribute`` names that are missing, for the warning and the tests.
    missing: tuple[str, ...]


def _missing(
    module: ModuleType,
    attributes: tuple[tuple[str, str, tuple[str, ...]], ...],
    methods: tuple[tuple[str, str], ...],
) -> list[str]:
    missing: list[str] = []
    for cls_name, method, names in attributes:
        code = getattr(getattr(getattr(module, cls_name, None), method, None), "__code__", None)
        stored = set(code.co_names) if code is not None else set()
        missing += [f"{cls_name}.{name}" for name in names if name not in stored]
    for cls_name, method in methods:
        if not callable(getattr(getattr(module, cls_name, None), method, None)):
            missing.append(f"{cls_name}.{method}()")
    return missing


def check_uvicorn() -> UvicornSeam:
    """Verify the installed uvicorn; turn off (with a WARNING) what cannot work on it.

    Sets :attr:`DirectWriter.enabled`; the caller picks the HTTP protocol from ``head_deadline``.
    """
    try:
        module = importlib.import_module(HTTPTOOLS_MODULE)
    except ImportError as exc:
        direct = head = [f"{HTTPTOOLS_MODULE} ({exc})"]
    else:
        direct = _missing(module, _DIRECT_WRITE_ATTRIBUTES, _DIRECT_WRITE_METHODS)
        head = _missing(module, _HEAD_DEADLINE_ATTRIBUTES, _HEAD_DEADLINE_METHODS)
    DirectWriter.enabled = not direct
    if direct:
        log.warning(
            "uvicorn %s lacks what direct writes read (%s): streams fall back to ASGI send, which"
            " costs far more CPU per delivery; install the uvicorn version pinned in"
            " services/relay/pyproject.toml",
            _version(),
            ", ".join(direct),
        )
    if head:
        log.warning(
            "uvicorn %s lacks what the request-head deadline extends (%s): serving with uvicorn's"
            " stock httptools protocol, without the head deadline and the cap on waiting"
            " connections; install the uvicorn version pinned in services/relay/pyproject.toml",
            _version(),
            ", ".join(head),
        )
    missing = tuple(dict.fromkeys(direct + head))
    return UvicornSeam(direct_writes=not direct, head_deadline=not head, missing=missing)


def _version() -> str:
    try:
        return str(importlib.import_module("uvicorn").__version__)
    except (ImportError, AttributeError):
        return "?"
