"""Event types of PROTOCOL §4 and their exact wire JSON.

Wire format: one compact JSON object (``separators=(",", ":")``, UTF-8, not ASCII-escaped) whose
keys appear in a fixed order: ``type``, then ``eventId`` and ``occurredAt`` when present, then the
event's own fields in the order they are declared below. The classes are the one source of that
order and of the names: the worker's Lua scripts publish through encoders generated from them
(:mod:`rapidphoto_contract.lua_scripts`). The tests hold both to the golden strings in
``tests/contract/test_events.py``, and every payload the scripts publish to ``decode_event`` then
``to_json``, byte for byte (``tests/worker/test_wire.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal, TypeAlias

import attrs

SESSION_STARTED: Final = "SESSION_STARTED"
PHOTO_UPLOADED: Final = "PHOTO_UPLOADED"
PHOTO_FAILED: Final = "PHOTO_FAILED"
SESSION_COMPLETED: Final = "SESSION_COMPLETED"
NOTIFICATION: Final = "notification"
SESSION_SNAPSHOT: Final = "SESSION_SNAPSHOT"
STREAM_CLOSED: Final = "STREAM_CLOSED"
SESSION_CLOSED: Final = "SESSION_CLOSED"

#: Every event type a relay stream can carry, for ``/api/realtime/info`` (PROTOCOL §5).
MESSAGE_TYPES: Final = (
    SESSION_SNAPSHOT,
    SESSION_STARTED,
    PHOTO_UPLOADED,
    PHOTO_FAILED,
    SESSION_COMPLETED,
    STREAM_CLOSED,
    NOTIFICATION,
    SESSION_CLOSED,
)

Status: TypeAlias = Literal["IN_PROGRESS", "COMPLETED"]
STATUS_IN_PROGRESS: Final = "IN_PROGRESS"
STATUS_COMPLETED: Final = "COMPLETED"

#: ``notification.kind`` sent when a session completes.
KIND_UPLOAD_SESSION_COMPLETED: Final = "UPLOAD_SESSION_COMPLETED"

#: Why the relay closed a stream (``STREAM_CLOSED.reason``, PROTOCOL §5).
CloseReason: TypeAlias = Literal[
    "completed", "token-expired", "slow-consumer", "shutdown", "forbidden", "session-not-found"
]

#: Why a multi-session stream dropped one of its sessions (``SESSION_CLOSED.reason``, PROTOCOL §5.1).
SessionCloseReason: TypeAlias = Literal["forbidden", "session-not-found"]


class EventDecodeError(ValueError):
    """A payload that is not a well-formed event of a known type."""


def progress_percent(uploaded: int, failed: int, total: int) -> int:
    """``floor(100 * (uploaded + failed) / total)``, PROTOCOL §4 (0 for a zero total)."""
    return (100 * (uploaded + failed)) // total if total > 0 else 0


def dumps(obj: Mapping[str, Any]) -> str:
    """The one JSON encoding used on the wire."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def wire_name(name: str) -> str:
    """The camelCase wire name of an event attribute (``session_id`` -> ``sessionId``)."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@attrs.frozen(kw_only=True)
class _Event:
    """Base: subclasses declare ``TYPE`` and their fields in wire order."""

    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue  # optional fields are omitted, never null
            if isinstance(value, tuple):
                value = [item.to_dict() if hasattr(item, "to_dict") else item for item in value]
            out[wire_name(field.name)] = value
        return out

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for field in attrs.fields(cls):
            key = wire_name(field.name)
            if key in data:
                kwargs[field.name] = data[key]
            elif field.default is attrs.NOTHING:
                raise EventDecodeError(f"{cls.TYPE}: missing field {key!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise EventDecodeError(f"{cls.TYPE}: {exc}") from exc


def _int(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer")


def _str(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string")


def _opt_str(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string")


@attrs.frozen(kw_only=True)
class _Progress(_Event):
    event_id: str | None = attrs.field(default=None, validator=_opt_str)
    occurred_at: str | None = attrs.field(default=None, validator=_opt_str)
    session_id: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class SessionStarted(_Progress):
    TYPE: ClassVar[str] = SESSION_STARTED
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)
    progress_percent: int = attrs.field(validator=_int)
    status: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class PhotoUploaded(_Progress):
    TYPE: ClassVar[str] = PHOTO_UPLOADED
    photo_id: str = attrs.field(validator=_str)
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)
    progress_percent: int = attrs.field(validator=_int)
    status: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class PhotoFailed(_Progress):
    TYPE: ClassVar[str] = PHOTO_FAILED
    photo_id: str = attrs.field(validator=_str)
    reason: str = attrs.field(validator=_str)
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)
    progress_percent: int = attrs.field(validator=_int)
    status: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class SessionCompleted(_Progress):
    TYPE: ClassVar[str] = SESSION_COMPLETED
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)
    progress_percent: int = attrs.field(validator=_int)
    status: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class Notification(_Event):
    TYPE: ClassVar[str] = NOTIFICATION
    event_id: str | None = attrs.field(default=None, validator=_opt_str)
    occurred_at: str | None = attrs.field(default=None, validator=_opt_str)
    kind: str = attrs.field(validator=_str)
    user_id: str = attrs.field(validator=_str)
    session_id: str = attrs.field(validator=_str)
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)


@attrs.frozen(kw_only=True)
class Failure:
    """One currently failed photo in a snapshot."""

    photo_id: str = attrs.field(validator=_str)
    reason: str = attrs.field(validator=_str)

    def to_dict(self) -> dict[str, Any]:
        return {"photoId": self.photo_id, "reason": self.reason}


def _failures(value: object) -> tuple[Failure, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("failures must be a list")
    out = []
    for item in value:
        if isinstance(item, Failure):
            out.append(item)
        elif isinstance(item, Mapping) and "photoId" in item and "reason" in item:
            out.append(Failure(photo_id=item["photoId"], reason=item["reason"]))
        else:
            raise ValueError("failures items must be {photoId, reason}")
    return tuple(out)


@attrs.frozen(kw_only=True)
class SessionSnapshot(_Event):
    """The relay's resynchronisation event; ``event_id`` is the newest log entry it reflects."""

    TYPE: ClassVar[str] = SESSION_SNAPSHOT
    event_id: str | None = attrs.field(default=None, validator=_opt_str)
    session_id: str = attrs.field(validator=_str)
    total_photos: int = attrs.field(validator=_int)
    uploaded_photos: int = attrs.field(validator=_int)
    failed_photos: int = attrs.field(validator=_int)
    progress_percent: int = attrs.field(validator=_int)
    status: str = attrs.field(validator=_str)
    failures: tuple[Failure, ...] = attrs.field(factory=tuple, converter=_failures)


@attrs.frozen(kw_only=True)
class StreamClosed(_Event):
    TYPE: ClassVar[str] = STREAM_CLOSED
    reason: str = attrs.field(validator=_str)


@attrs.frozen(kw_only=True)
class SessionClosed(_Event):
    """A multi-session stream goes on without this session (PROTOCOL §5.1): it never appeared
    (``session-not-found``) or appeared with another owner (``forbidden``)."""

    TYPE: ClassVar[str] = SESSION_CLOSED
    session_id: str = attrs.field(validator=_str)
    reason: str = attrs.field(validator=_str)


Event: TypeAlias = (
    SessionStarted
    | PhotoUploaded
    | PhotoFailed
    | SessionCompleted
    | Notification
    | SessionSnapshot
    | StreamClosed
    | SessionClosed
)

_BY_TYPE: Final[dict[str, type[_Event]]] = {
    cls.TYPE: cls
    for cls in (
        SessionStarted,
        PhotoUploaded,
        PhotoFailed,
        SessionCompleted,
        Notification,
        SessionSnapshot,
        StreamClosed,
        SessionClosed,
    )
}


def decode_event(payload: str | bytes) -> Event:
    """Decode a wire payload into its event type; :class:`EventDecodeError` if it is not one."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventDecodeError(f"not JSON: {exc}") from exc
    except RecursionError:
        # json's C scanner recurses per nesting level: 64 KiB of "[" is a valid-size payload.
        raise EventDecodeError("not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise EventDecodeError("payload is not a JSON object")
    event_type = data.get("type")
    if not isinstance(event_type, str):
        # Checked before the lookup: a list or object here is unhashable (TypeError, not ours).
        raise EventDecodeError("payload has no string 'type'")
    cls = _BY_TYPE.get(event_type)
    if cls is None:
        raise EventDecodeError(f"unknown event type {event_type!r}")
    event: Event = cls.from_dict(data)
    return event
