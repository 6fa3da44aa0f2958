"""The cursor of a multi-session stream (PROTOCOL §5.1): where every session and the notifications
stand, as one opaque ``id:`` string.

    m1.<tag>~<ms>-<seq>.<tag>~x.n~<ms>-<seq>

``m1`` is the format's version. Each item is a session's *tag* and its position: the log id of the
last entry delivered (or reflected by its snapshot; ``0-0`` for a snapshot of an empty log), or
``x`` for a session the stream closed with ``SESSION_CLOSED``; ``n`` is the notifications' item. A
session without an item has delivered nothing yet (it was still pending) and starts over.

A tag is 48 bits of BLAKE2b of the session id, in base64url (8 characters), not the id itself: ids
may be 128 characters, and 32 of them would not fit the 4 KiB the protocol promises. Every character
is URL-unreserved, so the cursor goes into a query string (``lastEventId``) unescaped; at the
maximum of 32 sessions and the notifications it is at most 33 x 51 + 2 bytes (1.7 KiB).

The cursor says only *where* to resume, never *what* to read: the sessions are those the request
asks for, and ownership is checked on them (``streams.py``). A forged cursor can only make the
caller's own sessions resume at another position: a position that is not covered gets a snapshot,
as on a single stream. Two requested sessions whose tags collide (a chance of 2⁻⁴⁸ per pair) both
ignore the cursor and start with their snapshots.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from rapidphoto_contract.stream_ids import StreamId, parse_stream_id

VERSION: Final = "m1"
NOTIFICATIONS_TAG: Final = "n"
CLOSED: Final = "x"
#: A longer ``Last-Event-ID`` is not a cursor of ours (the header limits bound it anyway).
MAX_CURSOR_LENGTH: Final = 8192
_TAG_LENGTH: Final = 8
_TAG_ALPHABET: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def session_tag(session_id: str) -> str:
    digest = hashlib.blake2b(session_id.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()


@attrs.frozen
class ParsedCursor:
    """A cursor read back: tag → log id, or ``None`` for a closed session."""

    positions: Mapping[str, StreamId | None]

    def lookup(self, tag: str) -> tuple[bool, StreamId | None]:
        """(present, position): absent tags start over; a present ``None`` is a closed session."""
        if tag not in self.positions:
            return False, None
        return True, self.positions[tag]


def parse_cursor(raw: str | None) -> ParsedCursor | None:
    """The cursor in ``raw``, or ``None`` when it is absent or malformed (PROTOCOL §5.1: none)."""
    if not raw or len(raw) > MAX_CURSOR_LENGTH:
        return None
    version, _, rest = raw.partition(".")
    if version != VERSION:
        return None
    positions: dict[str, StreamId | None] = {}
    if not rest:
        return ParsedCursor(positions)
    for item in rest.split("."):
        tag, sep, where = item.partition("~")
        if not sep or not _valid_tag(tag) or tag in positions:
            return None
        if where == CLOSED and tag != NOTIFICATIONS_TAG:
            positions[tag] = None
            continue
        position = parse_stream_id(where)
        if position is None:
            return None
        positions[tag] = position
    return ParsedCursor(positions)


def _valid_tag(tag: str) -> bool:
    if tag == NOTIFICATIONS_TAG:
        return True
    return len(tag) == _TAG_LENGTH and all(c in _TAG_ALPHABET for c in tag)


def colliding(tags: Iterable[str]) -> frozenset[str]:
    """Tags that appear more than once among ``tags``."""
    seen: set[str] = set()
    twice: set[str] = set()
    for tag in tags:
        (twice if tag in seen else seen).add(tag)
    return frozenset(twice)
