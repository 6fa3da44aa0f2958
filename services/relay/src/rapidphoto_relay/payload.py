"""The channel payload rule of PROTOCOL §4, and turning a valid payload into a framed :class:`Message`.

Anyone may ``PUBLISH`` to our channels, so every payload is checked once, in the hub, before it
reaches a stream: a UTF-8 JSON object of at most 64 KiB whose ``type`` is a string matching
``^[A-Za-z0-9_.-]{1,64}$``. Anything else is dropped (logged and counted by the caller).

A payload's ``eventId`` becomes the SSE ``id:`` only when it is a real log entry id (``<ms>-<seq>``):
an ``id:`` line overwrites the browser's last event id, so a made-up one would turn the client's
next reconnection into a snapshot instead of an exact replay.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

import msgspec

from rapidphoto_contract.events import SESSION_COMPLETED
from rapidphoto_contract.stream_ids import StreamId, parse_stream_id
from rapidphoto_relay import sse

MAX_PAYLOAD_BYTES: Final = 64 * 1024
TYPE_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_decoder: Final = msgspec.json.Decoder()


class Message:
    """A channel message as the hub framed it once, shared by every stream of the channel.

    ``stream_id`` is the parsed ``eventId`` when it is a log entry id (``None`` for raw publishes
    without one); ``terminal`` marks a ``SESSION_COMPLETED`` from the log, after which a session
    stream closes (PROTOCOL §5); ``occurred_at`` is the publisher's clock (epoch seconds) for the lag
    histogram, observed once per message and process (``observed``).
    """

    __slots__ = ("chunk", "frame", "observed", "occurred_at", "stream_id", "tail", "terminal")

    def __init__(
        self,
        frame: bytes,
        stream_id: StreamId | None = None,
        *,
        terminal: bool = False,
        occurred_at: float | None = None,
    ) -> None:
        self.frame = frame
        self.stream_id = stream_id
        self.terminal = terminal
        self.occurred_at = occurred_at
        self.observed = occurred_at is None
        #: ``frame`` as an HTTP/1.1 chunk, encoded by the first direct write and then shared.
        self.chunk: bytes | None = None
        #: ``frame`` from the end of its ``id:`` line (``\n`` first), cut by the first
        #: multi-session stream that delivers it (each writes its own cursor as ``id:``), then
        #: shared by every stream.
        self.tail: bytes | None = None

    def after_id(self) -> bytes:
        """``frame`` from the end of its ``id:`` line on (``b"\n" + frame`` without one): cut
        once per message, not once per stream."""
        tail = self.tail
        if tail is None:
            frame = self.frame
            tail = frame[frame.index(b"\n") :] if frame.startswith(b"id: ") else b"\n" + frame
            self.tail = tail
        return tail


class InvalidPayload(ValueError):
    """A payload that breaks PROTOCOL §4; ``reason`` is a short label for logs and metrics."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    return stamp.timestamp()


def parse_payload(data: bytes) -> Message:
    """Validate one published payload and frame it, or raise :class:`InvalidPayload`."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload("too-large")
    try:
        obj = _decoder.decode(data)  # strict: invalid UTF-8, NaN, trailing junk are all errors
    except UnicodeDecodeError:
        # msgspec checks UTF-8 only inside strings, and reports it as a UnicodeDecodeError, not a
        # DecodeError: ``{"type":"X","x":"\xff"}`` once escaped this function and cut the hub's
        # connection (issue 9, fault 1).
        raise InvalidPayload("not-utf8") from None
    except RecursionError:
        # Nesting deeper than msgspec's limit (``[[[…]]]``, a thousand levels fit in 2 KiB).
        raise InvalidPayload("too-deep") from None
    except msgspec.DecodeError:
        raise InvalidPayload("not-json") from None
    if not isinstance(obj, dict):
        raise InvalidPayload("not-object")
    event_type = obj.get("type")
    if not isinstance(event_type, str) or TYPE_PATTERN.fullmatch(event_type) is None:
        raise InvalidPayload("bad-type")
    raw_id = obj.get("eventId")
    stream_id: StreamId | None = parse_stream_id(raw_id) if isinstance(raw_id, str) else None
    frame = sse.event(
        data, event_type=event_type, event_id=raw_id if stream_id is not None else None
    )
    return Message(
        frame,
        stream_id,
        terminal=stream_id is not None and event_type == SESSION_COMPLETED,
        occurred_at=_epoch(obj.get("occurredAt")),
    )


def log_entry_message(entry_id: bytes | str, event_type: bytes | str, data: bytes) -> Message:
    """Frame one event-log entry (written by the worker, so trusted) for a replay."""
    stream_id = parse_stream_id(entry_id)
    kind = event_type.decode() if isinstance(event_type, bytes) else event_type
    return Message(
        sse.event(data, event_type=kind, event_id=entry_id),
        stream_id,
        terminal=stream_id is not None and kind == SESSION_COMPLETED,
    )
