"""Properties of the channel payload check (PROTOCOL §4) for arbitrary bytes and JSON (issue 9)."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rapidphoto_contract.events import SESSION_COMPLETED
from rapidphoto_contract.stream_ids import format_stream_id, parse_stream_id
from rapidphoto_relay.payload import MAX_PAYLOAD_BYTES, InvalidPayload, Message, parse_payload
from tests.relay.test_sse_properties import StreamParser
from tests.support.properties import PROPERTY, json_values

TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

event_types = st.from_regex(TYPE, fullmatch=True) | st.text(max_size=70) | json_values
event_ids = (
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(format_stream_id)
    | st.text(max_size=30)
    | json_values
)
payload_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": event_types,
        "eventId": event_ids,
        "occurredAt": st.datetimes().map(lambda d: d.isoformat()) | st.text() | json_values,
        "extra": json_values,
    },
)


def _check(data: bytes) -> Message | InvalidPayload:
    try:
        return parse_payload(data)
    except InvalidPayload as exc:
        return exc


@PROPERTY
@given(data=st.binary(max_size=2048))
@example(data=b'{"type":"X","x":"\xff\xfe"}')  # UnicodeDecodeError cut the hub's connection
@example(data=b"[" * 2000 + b"]" * 2000)  # RecursionError ended the hub's reader
@example(data=b'{"type":"X","x":"\\ud800"}')
def test_arbitrary_bytes_are_a_message_or_invalid_payload(data: bytes) -> None:
    """Rule (PROTOCOL §4): any bytes at all are either a framed message or ``InvalidPayload`` with a
    reason; no other exception, which the hub would otherwise have to survive."""
    result = _check(data)
    if isinstance(result, InvalidPayload):
        assert result.reason in {
            "not-json",
            "not-utf8",
            "too-deep",
            "too-large",
            "not-object",
            "bad-type",
        }


@PROPERTY
@given(obj=payload_objects)
@example(obj={"type": "SESSION_COMPLETED", "eventId": "18446744073709551615-0"})
@example(obj={"type": "X", "eventId": "18446744073709551616-0"})  # past 64 bits: no id
@example(obj={"type": "X", "eventId": " 1-0"})
def test_valid_payloads_keep_type_and_only_real_log_ids(obj: dict[str, Any]) -> None:
    """Rule (PROTOCOL §4, §5): a JSON object is accepted iff its ``type`` is a string matching
    ``^[A-Za-z0-9_.-]{1,64}$``; the frame then carries that ``event:``, the payload's exact bytes
    as ``data:``, and an ``id:`` only when ``eventId`` is a log entry id (``<ms>-<seq>``, 64-bit
    parts); ``SESSION_COMPLETED`` with such an id is terminal."""
    data = json.dumps(obj).encode()
    result = _check(data)
    event_type = obj.get("type")
    if not (isinstance(event_type, str) and TYPE.fullmatch(event_type)):
        assert isinstance(result, InvalidPayload)
        assert result.reason == "bad-type"
        return
    assert isinstance(result, Message)
    raw_id = obj.get("eventId")
    sid = parse_stream_id(raw_id) if isinstance(raw_id, str) else None
    assert result.stream_id == sid
    assert result.terminal == (sid is not None and event_type == SESSION_COMPLETED)
    parser = StreamParser()
    parser.feed(result.frame)
    [event] = parser.events
    assert event.event == event_type
    assert event.data == data.decode()
    assert parser.fields_seen.count("id") == (sid is not None)
    if sid is not None:
        assert event.last_event_id == raw_id


@settings(max_examples=50, deadline=None)
@given(pad=st.integers(0, 64))
def test_size_limit_is_exact(pad: int) -> None:
    """Rule (PROTOCOL §4): at most 64 KiB is accepted, one byte more is ``too-large``."""
    head = b'{"type":"ok","pad":"'
    fill = MAX_PAYLOAD_BYTES - len(head) - 2 - pad
    assert isinstance(_check(head + b"x" * fill + b'"}'), Message)
    over = _check(head + b"x" * (fill + pad + 1) + b'"}')
    assert isinstance(over, InvalidPayload)
    assert over.reason == "too-large"
