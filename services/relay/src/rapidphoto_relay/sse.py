"""Pure Server-Sent Events framing (WHATWG HTML §9.2, "Server-sent events").

Everything here returns ready-to-send ``bytes``: the hub frames each message once and hands the same
object to every stream (CONVENTIONS §6). Rules that matter for correctness:

- a field value never contains CR or LF, or the client would read the rest as another field, so
  ``id`` and ``event`` are stripped of them (and ``id`` of NUL, which makes browsers ignore it);
- text is sent as UTF-8, so lone surrogates (which it cannot carry) are dropped;
- multi-line data becomes one ``data:`` line per line; the client joins them back with ``\\n``;
- a frame ends with a blank line; comment lines start with ``:`` and are ignored by clients, which
  makes them the heartbeat (they keep proxies and NATs from closing idle connections).
"""

from __future__ import annotations

import re
from typing import Final

_LINE_BREAK: Final = re.compile(rb"\r\n|\r|\n")
_FIELD_JUNK: Final = re.compile(rb"[\r\n\x00]")


def _bytes(value: str | bytes) -> bytes:
    # "ignore": a lone surrogate (a str from JSON "\ud800") cannot be UTF-8; it is dropped rather
    # than raise UnicodeEncodeError from the middle of a stream (found by the property tests).
    return value.encode("utf-8", "ignore") if isinstance(value, str) else value


def _field(value: str | bytes) -> bytes:
    raw = _bytes(value)
    return _FIELD_JUNK.sub(b"", raw) if _FIELD_JUNK.search(raw) else raw


def event(
    data: str | bytes, *, event_type: str | bytes | None = None, event_id: str | bytes | None = None
) -> bytes:
    """One event frame: ``id:`` (if given), ``event:`` (if given), ``data:`` line(s), blank line."""
    parts: list[bytes] = []
    if event_id is not None:
        parts.append(b"id: " + _field(event_id) + b"\n")
    if event_type is not None:
        parts.append(b"event: " + _field(event_type) + b"\n")
    payload = _bytes(data)
    if b"\n" in payload or b"\r" in payload:
        for line in _LINE_BREAK.split(payload):
            parts.append(b"data: " + line + b"\n")
    else:
        parts.append(b"data: " + payload + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


def comment(text: str = "") -> bytes:
    """A comment frame (heartbeat). Line breaks in ``text`` become separate comment lines."""
    lines = _LINE_BREAK.split(_bytes(text)) if text else [b""]
    return b"".join(b": " + line + b"\n" if line else b":\n" for line in lines) + b"\n"


def retry(milliseconds: int) -> bytes:
    """The reconnection delay frame, sent alone and first (PROTOCOL §5)."""
    if milliseconds < 0:
        raise ValueError("retry must be non-negative")
    return b"retry: %d\n\n" % milliseconds


#: The heartbeat every idle stream gets (PROTOCOL §5); built once.
HEARTBEAT: Final = comment("heartbeat")
