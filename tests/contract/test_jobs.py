"""Jobs (PROTOCOL §3): argument rules and the JSON job codec (the client: tests/tools)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import arq.jobs
import attrs
import pytest

from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    EXCEPTION_KEY,
    FAIL_PHOTO_UPLOAD,
    JOB_NAMES,
    MAX_REASON_LENGTH,
    MAX_TOTAL_PHOTOS,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    CompletePhotoUpload,
    FailPhotoUpload,
    InvalidCommand,
    JobError,
    StartUploadSession,
    deserialize_job,
    serialize_job,
)


def test_job_names_and_queue() -> None:
    assert JOB_NAMES == ("start_upload_session", "complete_photo_upload", "fail_photo_upload")
    assert (START_UPLOAD_SESSION, COMPLETE_PHOTO_UPLOAD, FAIL_PHOTO_UPLOAD) == JOB_NAMES
    assert QUEUE_NAME == "arq:queue"
    assert MAX_TOTAL_PHOTOS == 10_000


# --- parse ---------------------------------------------------------------------------------------


def test_parse_start() -> None:
    cmd = StartUploadSession.parse({"session_id": "s1", "user_id": "u1", "total_photos": 10})
    assert cmd == StartUploadSession(session_id="s1", user_id="u1", total_photos=10)
    assert (
        StartUploadSession.parse(
            {"session_id": "s1", "user_id": "u1", "total_photos": 1}
        ).total_photos
        == 1
    )
    assert (
        StartUploadSession.parse(
            {"session_id": "s1", "user_id": "u1", "total_photos": 10_000}
        ).total_photos
        == 10_000
    )


def test_parse_complete() -> None:
    assert CompletePhotoUpload.parse({"session_id": "s1", "photo_id": "p1"}) == CompletePhotoUpload(
        session_id="s1", photo_id="p1"
    )


def test_parse_fail() -> None:
    cmd = FailPhotoUpload.parse({"session_id": "s1", "photo_id": "p1", "reason": "corrupt file"})
    assert cmd == FailPhotoUpload(session_id="s1", photo_id="p1", reason="corrupt file")
    longest = "é" * MAX_REASON_LENGTH  # characters, not bytes
    assert (
        FailPhotoUpload.parse({"session_id": "s1", "photo_id": "p1", "reason": longest}).reason
        == longest
    )


START_OK = {"session_id": "s1", "user_id": "u1", "total_photos": 10}
COMPLETE_OK = {"session_id": "s1", "photo_id": "p1"}
FAIL_OK = {"session_id": "s1", "photo_id": "p1", "reason": "corrupt file"}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP: Any = object()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(START_OK, total_photos="10"), "total_photos must be an integer, got str"),
        (_with(START_OK, total_photos=10.0), "total_photos must be an integer, got float"),
        (_with(START_OK, total_photos=True), "total_photos must be an integer, got bool"),
        (_with(START_OK, total_photos=None), "total_photos must be an integer, got NoneType"),
        (_with(START_OK, total_photos=0), "total_photos must be between 1 and 10000, got 0"),
        (_with(START_OK, total_photos=-5), "total_photos must be between 1 and 10000, got -5"),
        (_with(START_OK, total_photos=10_001), "total_photos must be between 1 and 10000"),
        (_with(START_OK, session_id=5), "session_id must match"),
        (_with(START_OK, session_id="a:b"), "session_id must match"),
        (_with(START_OK, session_id="notifications"), "session_id must match"),
        (_with(START_OK, user_id="u 1"), "user_id must match"),
        (_with(START_OK, user_id=None), "user_id must match"),
        (_with(START_OK, total_photos=_DROP), "missing argument(s) total_photos"),
        ({}, "missing argument(s) session_id, user_id, total_photos"),
        (_with(START_OK, extra=1), "unexpected argument(s) extra"),
        (_with(START_OK, photo_id="p1"), "unexpected argument(s) photo_id"),
    ],
)
def test_parse_start_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        StartUploadSession.parse(kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(COMPLETE_OK, session_id=None), "session_id must match"),
        (_with(COMPLETE_OK, session_id="x" * 129), "session_id must match"),
        (_with(COMPLETE_OK, photo_id=1), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id="p*"), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id="ph\u00f6to"), "photo_id must match"),
        (_with(COMPLETE_OK, photo_id=_DROP), "missing argument(s) photo_id"),
        (_with(COMPLETE_OK, reason="x"), "unexpected argument(s) reason"),
    ],
)
def test_parse_complete_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        CompletePhotoUpload.parse(kwargs)
    assert message in str(info.value)
    assert str(info.value).startswith(("complete_photo_upload", "session_id", "photo_id"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (_with(FAIL_OK, reason=""), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason="   \n"), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason=None), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason=["x"]), "reason must be a non-empty string"),
        (_with(FAIL_OK, reason="x" * 1025), "reason must be at most 1024 characters"),
        (_with(FAIL_OK, session_id="s{1}"), "session_id must match"),
        (_with(FAIL_OK, photo_id=""), "photo_id must match"),
        (_with(FAIL_OK, reason=_DROP), "missing argument(s) reason"),
        (_with(FAIL_OK, user_id="u1"), "unexpected argument(s) user_id"),
    ],
)
def test_parse_fail_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        FailPhotoUpload.parse(kwargs)
    assert message in str(info.value)


def test_reason_with_a_lone_surrogate_is_rejected() -> None:
    """Regression: a reason holding a lone surrogate (JSON ``"\\ud800"``, which the job codec
    carries happily) passed validation and would have reached the UTF-8 wire, where encoding the
    event fails; it is now an invalid command."""
    kwargs = json.loads('{"session_id":"s1","photo_id":"p1","reason":"bad \\ud800 byte"}')
    with pytest.raises(InvalidCommand, match="lone surrogates"):
        FailPhotoUpload.parse(kwargs)


def test_invalid_command_is_a_value_error() -> None:
    assert issubclass(InvalidCommand, ValueError)


# --- the JSON codec ------------------------------------------------------------------------------

JOB = {
    "t": 1,
    "f": "fail_photo_upload",
    "a": [],
    "k": {"session_id": "s1", "photo_id": "p1", "reason": "fichier corrompu / été"},
    "et": 1764213600000,
}


def test_serialize_job_is_utf8_json_never_pickle() -> None:
    raw = serialize_job(JOB)
    assert isinstance(raw, bytes)
    assert raw.startswith(b"{")
    assert not raw.startswith(b"\x80")  # pickle's protocol marker
    assert json.loads(raw.decode("utf-8")) == JOB
    assert raw == (
        b'{"t":1,"f":"fail_photo_upload","a":[],"k":{"session_id":"s1","photo_id":"p1",'
        b'"reason":"fichier corrompu / \\u00e9t\\u00e9"},"et":1764213600000}'
    )


def test_codec_round_trip() -> None:
    assert deserialize_job(serialize_job(JOB)) == JOB


def test_codec_round_trip_through_arq() -> None:
    """arq's own (de)serialisation functions, with our codec plugged in, agree with the layout."""
    raw = arq.jobs.serialize_job(
        "complete_photo_upload",
        (),
        {"session_id": "s1", "photo_id": "p1"},
        None,
        1764213600000,
        serializer=serialize_job,
    )
    assert json.loads(raw) == {
        "t": None,
        "f": "complete_photo_upload",
        "a": [],
        "k": {"session_id": "s1", "photo_id": "p1"},
        "et": 1764213600000,
    }
    job = arq.jobs.deserialize_job(raw, deserializer=deserialize_job)
    assert job.function == "complete_photo_upload"
    assert job.kwargs == {"session_id": "s1", "photo_id": "p1"}
    assert job.enqueue_time == dt.datetime(2025, 11, 27, 3, 20, tzinfo=dt.UTC)


def test_exception_results_become_job_errors() -> None:
    raw = arq.jobs.serialize_result(
        "start_upload_session",
        (),
        {"session_id": "s1", "user_id": "u1", "total_photos": 0},
        1,
        1764213600000,
        False,
        InvalidCommand("total_photos must be between 1 and 10000, got 0"),
        1764213600001,
        1764213600002,
        "ref",
        QUEUE_NAME,
        "job-1",
        serializer=serialize_job,
    )
    assert raw is not None
    data = json.loads(raw)
    assert data["r"] == {
        EXCEPTION_KEY: "InvalidCommand",
        "message": "total_photos must be between 1 and 10000, got 0",
    }
    result = arq.jobs.deserialize_result(raw, deserializer=deserialize_job)
    assert result.success is False
    assert isinstance(result.result, JobError)
    assert result.result.exc_type == "InvalidCommand"
    assert result.result.message == "total_photos must be between 1 and 10000, got 0"
    assert str(result.result) == "InvalidCommand: total_photos must be between 1 and 10000, got 0"


def test_results_of_other_types() -> None:
    @attrs.frozen
    class Outcome:
        changed: bool
        event_id: str | None

    when = dt.datetime(2026, 11, 27, 3, 20, tzinfo=dt.UTC)
    raw = serialize_job({"r": [Outcome(changed=True, event_id="1-0"), when, None]})
    assert json.loads(raw) == {
        "r": [{"changed": True, "event_id": "1-0"}, "2026-11-27T03:20:00+00:00", None]
    }


def test_unserializable_result_is_an_error_arq_can_report() -> None:
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        serialize_job({"r": object()})


def test_exception_marker_inside_kwargs_stays_data() -> None:
    """Regression: the decoder turned *every* nested dict holding ``__exception__`` into a
    ``JobError`` (an ``object_hook``), so a job's own kwargs could be replaced by an exception.
    Only a result (``r``) is revived now."""
    raw = b'{"t":1,"f":"fail_photo_upload","a":[],"k":{"reason":{"__exception__":"X"}},"et":1}'
    assert deserialize_job(raw)["k"] == {"reason": {"__exception__": "X"}}


@pytest.mark.parametrize("raw", [b"[]", b'"job"', b"1", b"null"])
def test_deserialize_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        deserialize_job(raw)
    with pytest.raises(arq.jobs.DeserializationError):
        arq.jobs.deserialize_job(raw, deserializer=deserialize_job)


@pytest.mark.parametrize("raw", [b"", b"\x80\x04\x95", b"{not json", b"\xff\xfe"])
def test_deserialize_rejects_garbage_and_pickle(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (json's and UnicodeDecodeError alike)
        deserialize_job(raw)
