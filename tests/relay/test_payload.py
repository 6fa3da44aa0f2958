"""The PROTOCOL §4 payload rule, as the hub applies it to every published message."""

from __future__ import annotations

import json

import pytest

from rapidphoto_relay.payload import MAX_PAYLOAD_BYTES, InvalidPayload, parse_payload


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not-json"),
        (b"\xff\xfe{}", "not-json"),
        (b'{"type":"A"} trailing', "not-json"),
        # issue 9, fault 1: invalid UTF-8 inside a string is a UnicodeDecodeError in msgspec
        (b'{"type":"X","x":"\xff\xfe"}', "not-utf8"),
        (b'{"type":"\xed\xa0\x80"}', "not-utf8"),  # an encoded surrogate is not UTF-8
        (b"[" * 2000 + b"]" * 2000, "too-deep"),  # msgspec raises RecursionError
        (b"[1,2]", "not-object"),
        (b'"string"', "not-object"),
        (b"{}", "bad-type"),
        (b'{"type":1}', "bad-type"),
        (b'{"type":""}', "bad-type"),
        (b'{"type":"has space"}', "bad-type"),
        (b'{"type":"a:b"}', "bad-type"),
        (json.dumps({"type": "x" * 65}).encode(), "bad-type"),
        (b'{"type":"\xc3\xa9"}', "bad-type"),
        (b'{"type":"ok","pad":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}', "too-large"),
    ],
)
def test_invalid_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        parse_payload(payload)
    assert info.value.reason == reason


def test_payload_of_exactly_64_kib_is_accepted() -> None:
    head = b'{"type":"ok","pad":"'
    payload = head + b"x" * (MAX_PAYLOAD_BYTES - len(head) - 2) + b'"}'
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert parse_payload(payload).frame.endswith(payload + b"\n\n")


def test_worker_payload_gets_its_event_id_as_sse_id() -> None:
    payload = (
        b'{"type":"SESSION_COMPLETED","eventId":"17-2","occurredAt":"2026-01-01T00:00:00.000Z"}'
    )
    message = parse_payload(payload)
    assert message.frame == b"id: 17-2\nevent: SESSION_COMPLETED\ndata: " + payload + b"\n\n"
    assert message.stream_id == (17, 2)
    assert message.terminal
    assert message.occurred_at == 1767225600.0


def test_raw_payload_without_event_id_has_no_sse_id() -> None:
    message = parse_payload(b'{"type":"custom.thing-1"}')
    assert message.frame == b'event: custom.thing-1\ndata: {"type":"custom.thing-1"}\n\n'
    assert message.stream_id is None
    assert not message.terminal


@pytest.mark.parametrize("event_id", ["abc", "1", "1-", "-1", "1-2-3", 5])
def test_event_id_that_is_not_a_log_id_is_not_sent_as_sse_id(event_id: object) -> None:
    # An id: line would overwrite the browser's Last-Event-ID with something we cannot resume from.
    message = parse_payload(json.dumps({"type": "T", "eventId": event_id}).encode())
    assert b"id:" not in message.frame
    assert message.stream_id is None


def test_pretty_printed_json_is_framed_as_several_data_lines() -> None:
    payload = json.dumps({"type": "T", "a": 1}, indent=2).encode()
    frame = parse_payload(payload).frame
    assert frame.count(b"data: ") == payload.count(b"\n") + 1
