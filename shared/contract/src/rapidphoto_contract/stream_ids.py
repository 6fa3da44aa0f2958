"""Redis Stream entry ids (``<ms>-<seq>``), which are also the SSE event ids (PROTOCOL §4, §5).

Ids are compared as ``(ms, seq)`` integer pairs, never as strings: ``"9-0" > "10-0"`` as text. A
``Last-Event-ID`` comes from clients, so parsing is strict (both parts, decimal, each a 64-bit
unsigned integer as Redis defines them); anything else is *malformed*.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

#: ``(milliseconds, sequence)``; orders exactly as Redis orders entries.
StreamId: TypeAlias = tuple[int, int]

_MAX: Final = 2**64 - 1
_PATTERN: Final = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def parse_stream_id(value: str | bytes | None) -> StreamId | None:
    """``(ms, seq)`` for a complete entry id, else ``None`` (malformed or absent)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _PATTERN.fullmatch(value.strip())
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX or seq > _MAX:
        return None
    return ms, seq


def format_stream_id(sid: StreamId) -> str:
    """Canonical text form (no leading zeros), as Redis writes it."""
    return f"{sid[0]}-{sid[1]}"


def successor(sid: StreamId) -> StreamId:
    """The smallest id greater than ``sid``."""
    ms, seq = sid
    if seq < _MAX:
        return ms, seq + 1
    return ms + 1, 0
