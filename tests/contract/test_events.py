"""Event types and their exact wire JSON (PROTOCOL §4).

The golden strings are written out literally: they are the contract the worker's Lua scripts, the
relay and every browser client share, so a change here is a change of the public API.
"""

from __future__ import annotations

import json

import pytest

from rapidphoto_contract import events
from rapidphoto_contract.events import (
    MESSAGE_TYPES,
    EventDecodeError,
    Failure,
    Notification,
    PhotoFailed,
    PhotoUploaded,
    SessionClosed,
    SessionCompleted,
    SessionSnapshot,
    SessionStarted,
    StreamClosed,
    decode_event,
    dumps,
    progress_percent,
)

EID = "1764213600000-0"
AT = "2026-11-27T03:20:00.000Z"

GOLDEN: list[tuple[events.Event, str]] = [
    (
        SessionStarted(
            event_id=EID,
            occurred_at=AT,
            session_id="s1",
            total_photos=10,
            uploaded_photos=0,
            failed_photos=0,
            progress_percent=0,
            status="IN_PROGRESS",
        ),
        '{"type":"SESSION_STARTED","eventId":"1764213600000-0","occurredAt":"2026-11-27T03:20:00.000Z",'
        '"sessionId":"s1","totalPhotos":10,"uploadedPhotos":0,"failedPhotos":0,"progressPercent":0,'
        '"status":"IN_PROGRESS"}',
    ),
    (
        PhotoUploaded(
            event_id="1764213600001-3",
            occurred_at=AT,
            session_id="s1",
            photo_id="p1",
            total_photos=10,
            uploaded_photos=1,
            failed_photos=0,
            progress_percent=10,
            status="IN_PROGRESS",
        ),
        '{"type":"PHOTO_UPLOADED","eventId":"1764213600001-3","occurredAt":"2026-11-27T03:20:00.000Z",'
        '"sessionId":"s1","photoId":"p1","totalPhotos":10,"uploadedPhotos":1,"failedPhotos":0,'
        '"progressPercent":10,"status":"IN_PROGRESS"}',
    ),
    (
        PhotoFailed(
            event_id=EID,
            occurred_at=AT,
            session_id="s1",
            photo_id="p1",
            reason="corrupt file",
            total_photos=10,
            uploaded_photos=1,
            failed_photos=1,
            progress_percent=20,
            status="IN_PROGRESS",
        ),
        '{"type":"PHOTO_FAILED","eventId":"1764213600000-0","occurredAt":"2026-11-27T03:20:00.000Z",'
        '"sessionId":"s1","photoId":"p1","reason":"corrupt file","totalPhotos":10,"uploadedPhotos":1,'
        '"failedPhotos":1,"progressPercent":20,"status":"IN_PROGRESS"}',
    ),
    (
        SessionCompleted(
            event_id="1764213600009-0",
            occurred_at=AT,
            session_id="s1",
            total_photos=10,
            uploaded_photos=8,
            failed_photos=2,
            progress_percent=100,
            status="COMPLETED",
        ),
        '{"type":"SESSION_COMPLETED","eventId":"1764213600009-0","occurredAt":"2026-11-27T03:20:00.000Z",'
        '"sessionId":"s1","totalPhotos":10,"uploadedPhotos":8,"failedPhotos":2,"progressPercent":100,'
        '"status":"COMPLETED"}',
    ),
    (
        Notification(
            event_id="1764213600009-1",
            occurred_at=AT,
            kind="UPLOAD_SESSION_COMPLETED",
            user_id="u1",
            session_id="s1",
            total_photos=10,
            uploaded_photos=8,
            failed_photos=2,
        ),
        '{"type":"notification","eventId":"1764213600009-1","occurredAt":"2026-11-27T03:20:00.000Z",'
        '"kind":"UPLOAD_SESSION_COMPLETED","userId":"u1","sessionId":"s1","totalPhotos":10,'
        '"uploadedPhotos":8,"failedPhotos":2}',
    ),
    (
        SessionSnapshot(
            event_id="1764213600005-2",
            session_id="s1",
            total_photos=10,
            uploaded_photos=3,
            failed_photos=2,
            progress_percent=50,
            status="IN_PROGRESS",
            failures=(
                Failure(photo_id="p4", reason="too large"),
                Failure(photo_id="p7", reason="corrupt file"),
            ),
        ),
        '{"type":"SESSION_SNAPSHOT","eventId":"1764213600005-2","sessionId":"s1","totalPhotos":10,'
        '"uploadedPhotos":3,"failedPhotos":2,"progressPercent":50,"status":"IN_PROGRESS",'
        '"failures":[{"photoId":"p4","reason":"too large"},{"photoId":"p7","reason":"corrupt file"}]}',
    ),
    (
        # Before the first log entry a snapshot reflects no event: no eventId, never "eventId":null.
        SessionSnapshot(
            session_id="s1",
            total_photos=3,
            uploaded_photos=0,
            failed_photos=0,
            progress_percent=0,
            status="IN_PROGRESS",
        ),
        '{"type":"SESSION_SNAPSHOT","sessionId":"s1","totalPhotos":3,"uploadedPhotos":0,'
        '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS","failures":[]}',
    ),
    (
        StreamClosed(reason="completed"),
        '{"type":"STREAM_CLOSED","reason":"completed"}',
    ),
    (
        SessionClosed(session_id="s3", reason="session-not-found"),
        '{"type":"SESSION_CLOSED","sessionId":"s3","reason":"session-not-found"}',
    ),
    (
        # A published payload without worker metadata (another backend's PUBLISH).
        SessionStarted(
            session_id="s2",
            total_photos=1,
            uploaded_photos=0,
            failed_photos=0,
            progress_percent=0,
            status="IN_PROGRESS",
        ),
        '{"type":"SESSION_STARTED","sessionId":"s2","totalPhotos":1,"uploadedPhotos":0,'
        '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
    ),
]


@pytest.mark.parametrize(("event", "wire"), GOLDEN, ids=lambda v: getattr(v, "TYPE", None))
def test_exact_wire_json(event: events.Event, wire: str) -> None:
    assert event.to_json() == wire


@pytest.mark.parametrize(("event", "wire"), GOLDEN, ids=lambda v: getattr(v, "TYPE", None))
def test_decode_round_trip(event: events.Event, wire: str) -> None:
    decoded = decode_event(wire)
    assert decoded == event
    assert type(decoded) is type(event)
    assert decoded.to_json() == wire
    assert decode_event(wire.encode()) == event  # bytes, as redis-py hands them over


def test_every_message_type_has_a_golden_string() -> None:
    assert {e.TYPE for e, _ in GOLDEN} == set(MESSAGE_TYPES)
    assert len(MESSAGE_TYPES) == 8


def test_wire_json_is_a_single_line_object() -> None:
    for _, wire in GOLDEN:
        assert "\n" not in wire
        assert "\r" not in wire
        assert json.loads(wire)["type"] == json.loads(wire)["type"].strip()


def test_non_ascii_and_slash_are_not_escaped() -> None:
    event = PhotoFailed(
        event_id=EID,
        occurred_at=AT,
        session_id="s1",
        photo_id="p1",
        reason="fichier corrompu: été/hiver 写真 🙂",
        total_photos=3,
        uploaded_photos=0,
        failed_photos=1,
        progress_percent=33,
        status="IN_PROGRESS",
    )
    wire = event.to_json()
    assert '"reason":"fichier corrompu: été/hiver 写真 🙂"' in wire
    assert "\\u" not in wire
    assert "\\/" not in wire
    assert decode_event(wire.encode("utf-8")) == event


def test_control_characters_in_a_reason_stay_escaped() -> None:
    """A newline inside a value must not break the one-line SSE ``data:`` framing."""
    wire = StreamClosed(reason='a\nb\r"c"').to_json()
    assert wire == '{"type":"STREAM_CLOSED","reason":"a\\nb\\r\\"c\\""}'
    assert decode_event(wire) == StreamClosed(reason='a\nb\r"c"')


def test_dumps_is_compact_and_keeps_order() -> None:
    assert dumps({"b": 1, "a": [1, 2], "c": "é"}) == '{"b":1,"a":[1,2],"c":"é"}'


@pytest.mark.parametrize(
    ("uploaded", "failed", "total", "percent"),
    [
        (0, 0, 10, 0),
        (1, 0, 3, 33),  # 33.33 floors
        (2, 0, 3, 66),  # 66.67 floors, never rounds up
        (1, 1, 3, 66),
        (3, 0, 3, 100),
        (0, 1, 10000, 0),  # 0.01 floors to 0
        (9999, 0, 10000, 99),  # 99.99 is not "done"
        (10000, 0, 10000, 100),
        (0, 0, 0, 0),  # no division by zero
    ],
)
def test_progress_percent_floors(uploaded: int, failed: int, total: int, percent: int) -> None:
    assert progress_percent(uploaded, failed, total) == percent


def test_snapshot_failures_accept_wire_dicts() -> None:
    snap = SessionSnapshot(
        session_id="s1",
        total_photos=2,
        uploaded_photos=0,
        failed_photos=1,
        progress_percent=50,
        status="IN_PROGRESS",
        failures=[{"photoId": "p1", "reason": "x"}],
    )
    assert snap.failures == (Failure(photo_id="p1", reason="x"),)


def test_extra_fields_are_ignored_on_decode() -> None:
    """Forward compatibility: a newer producer may add fields."""
    decoded = decode_event('{"type":"STREAM_CLOSED","reason":"shutdown","extra":1}')
    assert decoded == StreamClosed(reason="shutdown")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("", id="empty"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param('{"type":"STREAM_CLOSED","reason":"x"', id="truncated"),
        pytest.param("[]", id="array"),
        pytest.param('"STREAM_CLOSED"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
        pytest.param("{}", id="no-type"),
        pytest.param('{"type":"SOMETHING_ELSE"}', id="unknown-type"),
        pytest.param('{"type":"session_started"}', id="type-wrong-case"),
        pytest.param('{"type":null,"reason":"x"}', id="type-null"),
        pytest.param('{"type":7,"reason":"x"}', id="type-number"),
        pytest.param('{"type":"STREAM_CLOSED"}', id="missing-reason"),
        pytest.param('{"type":"STREAM_CLOSED","reason":5}', id="reason-number"),
        pytest.param(
            '{"type":"PHOTO_FAILED","sessionId":"s1","photoId":"p1","totalPhotos":1,'
            '"uploadedPhotos":0,"failedPhotos":1,"progressPercent":100,"status":"IN_PROGRESS"}',
            id="photo-failed-missing-reason",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","sessionId":"s1","totalPhotos":"10","uploadedPhotos":0,'
            '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="total-as-string",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","sessionId":"s1","totalPhotos":10.0,"uploadedPhotos":0,'
            '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="total-as-float",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","sessionId":"s1","totalPhotos":true,"uploadedPhotos":0,'
            '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="total-as-bool",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","sessionId":"s1","totalPhotos":-1,"uploadedPhotos":0,'
            '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="total-negative",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","sessionId":5,"totalPhotos":1,"uploadedPhotos":0,'
            '"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="session-id-number",
        ),
        pytest.param(
            '{"type":"SESSION_STARTED","eventId":5,"sessionId":"s1","totalPhotos":1,'
            '"uploadedPhotos":0,"failedPhotos":0,"progressPercent":0,"status":"IN_PROGRESS"}',
            id="event-id-number",
        ),
        pytest.param(
            '{"type":"SESSION_SNAPSHOT","sessionId":"s1","totalPhotos":1,"uploadedPhotos":0,'
            '"failedPhotos":1,"progressPercent":100,"status":"IN_PROGRESS","failures":{}}',
            id="failures-not-list",
        ),
        pytest.param(
            '{"type":"SESSION_SNAPSHOT","sessionId":"s1","totalPhotos":1,"uploadedPhotos":0,'
            '"failedPhotos":1,"progressPercent":100,"status":"IN_PROGRESS",'
            '"failures":[{"photoId":"p1"}]}',
            id="failure-without-reason",
        ),
        pytest.param(
            '{"type":"SESSION_SNAPSHOT","sessionId":"s1","totalPhotos":1,"uploadedPhotos":0,'
            '"failedPhotos":1,"progressPercent":100,"status":"IN_PROGRESS",'
            '"failures":[{"photoId":1,"reason":"x"}]}',
            id="failure-photo-id-number",
        ),
        pytest.param(
            '{"type":"notification","kind":"UPLOAD_SESSION_COMPLETED","userId":"u1",'
            '"totalPhotos":1,"uploadedPhotos":1,"failedPhotos":0}',
            id="notification-missing-session",
        ),
    ],
)
def test_decode_errors(payload: str | bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(payload)


@pytest.mark.parametrize("payload", ['{"type":[],"reason":"x"}', '{"type":{"a":1},"reason":"x"}'])
def test_unhashable_type_is_a_decode_error(payload: str) -> None:
    """Regression: ``decode_event`` looked ``type`` up in a dict before checking it was a string,
    so a list or object there escaped as ``TypeError: unhashable type`` instead of
    :class:`EventDecodeError` (and would have crashed a relay reading a hostile PUBLISH)."""
    with pytest.raises(EventDecodeError, match="string 'type'"):
        decode_event(payload)


@pytest.mark.parametrize("payload", ["[" * 100_000, '{"a":' * 20_000 + "1" + "}" * 20_000])
def test_deep_nesting_is_a_decode_error(payload: str) -> None:
    """Regression: json's scanner recurses per nesting level, so a payload well under the 64 KiB
    limit (100,000 ``[``) escaped as ``RecursionError`` instead of :class:`EventDecodeError`."""
    with pytest.raises(EventDecodeError, match="nested too deeply"):
        decode_event(payload)


def test_decode_error_names_the_missing_field() -> None:
    with pytest.raises(EventDecodeError, match=r"STREAM_CLOSED: missing field 'reason'"):
        decode_event('{"type":"STREAM_CLOSED"}')


def test_event_decode_error_is_a_value_error() -> None:
    """Callers that guard with ``except ValueError`` keep working."""
    assert issubclass(EventDecodeError, ValueError)


def test_constructors_validate_types() -> None:
    with pytest.raises(ValueError, match="total_photos"):
        SessionStarted(
            session_id="s1",
            total_photos=True,
            uploaded_photos=0,
            failed_photos=0,
            progress_percent=0,
            status="IN_PROGRESS",
        )
    with pytest.raises(ValueError, match="reason"):
        StreamClosed(reason=None)  # type: ignore[arg-type]
