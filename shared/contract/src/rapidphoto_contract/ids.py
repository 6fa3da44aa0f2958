"""Identifier validation (PROTOCOL §3): one pattern, one error type.

Ids end up inside Redis key and channel names and in URLs, so the alphabet is deliberately small:
no ``:`` (our key separator), no glob characters (``*``, ``?``, ``[``) that would turn a channel
name into a pattern, no braces (Redis Cluster hash tags), no whitespace or non-ASCII.
"""

from __future__ import annotations

import re
from typing import Final

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")

#: ``/api/upload/sessions/notifications/stream`` is taken by the notification stream.
RESERVED_SESSION_IDS: Final = frozenset({"notifications"})


class InvalidId(ValueError):
    """An id that does not match ``^[A-Za-z0-9_-]{1,128}$`` (or a reserved session id)."""

    def __init__(self, field: str, value: object) -> None:
        self.field = field
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        super().__init__(f"{field} must match ^[A-Za-z0-9_-]{{1,128}}$, got {shown}")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def validate_id(field: str, value: object) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidId` naming ``field``."""
    if not is_valid_id(value):
        raise InvalidId(field, value)
    assert isinstance(value, str)
    return value


def validate_session_id(value: object, field: str = "session_id") -> str:
    session_id = validate_id(field, value)
    if session_id in RESERVED_SESSION_IDS:
        raise InvalidId(field, value)
    return session_id
