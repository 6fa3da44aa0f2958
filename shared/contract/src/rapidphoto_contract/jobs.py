"""The upload pipeline's interface (PROTOCOL §3): job names, arguments, the JSON codec.

Wire format of a queued job (arq's own layout, JSON instead of pickle)::

    {"t": 1, "f": "complete_photo_upload", "a": [],
     "k": {"session_id": "s1", "photo_id": "p1"}, "et": 1764213600000}

stored at ``arq:job:<job_id>``, with ``<job_id>`` added to the sorted set ``arq:queue`` (score: the
time in ms at which it may run). A pipeline written in another language enqueues by writing exactly
that; Python pipelines use ``rapidphoto_tools.client.UploadJobsClient``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any, Final, Self

import attrs

from rapidphoto_contract.ids import validate_id, validate_session_id

START_UPLOAD_SESSION: Final = "start_upload_session"
COMPLETE_PHOTO_UPLOAD: Final = "complete_photo_upload"
FAIL_PHOTO_UPLOAD: Final = "fail_photo_upload"
JOB_NAMES: Final = (START_UPLOAD_SESSION, COMPLETE_PHOTO_UPLOAD, FAIL_PHOTO_UPLOAD)

#: arq's default queue, named by PROTOCOL §3.
QUEUE_NAME: Final = "arq:queue"

MAX_TOTAL_PHOTOS: Final = 10_000
#: A failure reason is shown to people; keep it a readable line, not a payload.
MAX_REASON_LENGTH: Final = 1024


class InvalidCommand(ValueError):
    """A job's arguments break PROTOCOL §3's rules. Never retried; nothing changes."""


def _check_kwargs(job: str, kwargs: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    missing = [name for name in expected if name not in kwargs]
    unknown = sorted(set(kwargs) - set(expected))
    if missing:
        raise InvalidCommand(f"{job}: missing argument(s) {', '.join(missing)}")
    if unknown:
        raise InvalidCommand(f"{job}: unexpected argument(s) {', '.join(unknown)}")


def _valid(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise InvalidCommand(str(exc)) from None


@attrs.frozen(kw_only=True)
class StartUploadSession:
    session_id: str
    user_id: str
    total_photos: int

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(START_UPLOAD_SESSION, kwargs, ("session_id", "user_id", "total_photos"))
        total = kwargs["total_photos"]
        if not isinstance(total, int) or isinstance(total, bool):
            raise InvalidCommand(f"total_photos must be an integer, got {type(total).__name__}")
        if not 1 <= total <= MAX_TOTAL_PHOTOS:
            raise InvalidCommand(
                f"total_photos must be between 1 and {MAX_TOTAL_PHOTOS}, got {total}"
            )
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            user_id=_valid(validate_id, "user_id", kwargs["user_id"]),
            total_photos=total,
        )


@attrs.frozen(kw_only=True)
class CompletePhotoUpload:
    session_id: str
    photo_id: str

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(COMPLETE_PHOTO_UPLOAD, kwargs, ("session_id", "photo_id"))
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            photo_id=_valid(validate_id, "photo_id", kwargs["photo_id"]),
        )


@attrs.frozen(kw_only=True)
class FailPhotoUpload:
    session_id: str
    photo_id: str
    reason: str

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(FAIL_PHOTO_UPLOAD, kwargs, ("session_id", "photo_id", "reason"))
        reason = kwargs["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidCommand("reason must be a non-empty string")
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidCommand(f"reason must be at most {MAX_REASON_LENGTH} characters")
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\ud800") survives the job codec but not the UTF-8 wire.
            raise InvalidCommand("reason must be valid Unicode text (no lone surrogates)") from None
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            photo_id=_valid(validate_id, "photo_id", kwargs["photo_id"]),
            reason=reason,
        )


# --- the JSON job codec --------------------------------------------------------------------------

#: Key marking an exception in a serialized job result (arq stores the exception as the result).
EXCEPTION_KEY: Final = "__exception__"


class JobError(Exception):
    """A job's failure as read back from its JSON result: the worker's exception type and text."""

    def __init__(self, exc_type: str, message: str) -> None:
        self.exc_type = exc_type
        self.message = message
        super().__init__(f"{exc_type}: {message}")


def _default(obj: object) -> object:
    if isinstance(obj, BaseException):
        return {EXCEPTION_KEY: type(obj).__name__, "message": str(obj)}
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if attrs.has(type(obj)):
        return attrs.asdict(obj)  # type: ignore[arg-type]
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _revive(result: object) -> object:
    if isinstance(result, dict) and EXCEPTION_KEY in result:
        return JobError(str(result[EXCEPTION_KEY]), str(result.get("message", "")))
    return result


def serialize_job(data: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: UTF-8 JSON, never pickle (pickle from Redis would run code)."""
    return json.dumps(data, default=_default, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, Any]:
    """arq ``job_deserializer``: the inverse of :func:`serialize_job`; ``ValueError`` if not a job."""
    try:
        data = json.loads(raw)
    except RecursionError:
        # json.loads recurses per nesting level: 2 KB of "[[[…" raised RecursionError, not the
        # ValueError of any other bad input (found by the property tests, issue 9).
        raise ValueError("a job must be a JSON object, not nested this deep") from None
    if not isinstance(data, dict):
        raise ValueError("a job must be a JSON object")
    # Only a result ("r") can be an exception. Reviving any nested dict (as an object_hook would)
    # let a job's own kwargs turn into a JobError.
    if "r" in data:
        data["r"] = _revive(data["r"])
    return data
