"""Properties of the SSE framing (``rapidphoto_relay.sse``) for arbitrary text (issue 9).

Frames are read back with a parser written from the WHATWG rules ("Server-sent events",
"Interpreting an event stream"), not with our test client's simpler one: UTF-8 decoded with
replacement, lines ended by CRLF, CR or LF, ``field: value`` with one leading space removed,
``data`` lines joined with LF, an event dispatched by a blank line if it had a ``data`` line, an
``id`` containing NUL ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rapidphoto_relay import sse

PROPERTY = settings(max_examples=400, deadline=None)

#: Text that stresses framing: line breaks, NUL, lone surrogates, field-like text, non-ASCII.
_TRICKY = st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "\ud800", "\udfff", ":", " ", "data: x", "id: 9-9", "retry: 1"]
)
texts = st.lists(st.one_of(st.text(), _TRICKY), max_size=8).map("".join)

_LINE = re.compile(r"\r\n|\r|\n")


@dataclass
class Dispatched:
    data: str
    event: str  # "" means the default ("message")
    last_event_id: str


@dataclass
class StreamParser:
    """A conformant event-stream parser (WHATWG HTML, "Interpreting an event stream")."""

    events: list[Dispatched] = field(default_factory=list)
    last_event_id: str = ""
    retry: int | None = None
    fields_seen: list[str] = field(default_factory=list)

    def feed(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        text = text.removeprefix("\ufeff")
        data: list[str] = []
        event = ""
        lines = _LINE.split(text)
        if lines and lines[-1] == "":
            lines.pop()  # the text after the last line break is an incomplete line
        for line in lines:
            if line == "":
                if data:
                    self.events.append(Dispatched("\n".join(data), event, self.last_event_id))
                data, event = [], ""
                continue
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            self.fields_seen.append(name)
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                if "\x00" not in value:
                    self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)


def _sendable(text: str) -> str:
    """What of ``text`` UTF-8 can carry: lone surrogates are dropped."""
    return text.encode("utf-8", "ignore").decode("utf-8")


def _field_value(text: str) -> str:
    """A field value as framed: CR, LF and NUL stripped (PROTOCOL §5 framing rule), surrogates dropped."""
    return re.sub(r"[\r\n\x00]", "", _sendable(text))


@PROPERTY
@given(data=texts, event_type=st.none() | texts, event_id=st.none() | texts)
@example(data="a", event_type="\ud800", event_id=None)  # a lone surrogate raised UnicodeEncodeError
@example(data="\ud800x", event_type=None, event_id="1-0\ud800")
@example(data="x", event_type="T\r\ndata: injected", event_id="1\r\nretry: 1")
def test_an_event_frame_is_exactly_one_event_with_its_own_fields(
    data: str, event_type: str | None, event_id: str | None
) -> None:
    """Rule: whatever the text, ``sse.event`` produces one frame that a conformant parser reads as
    exactly one event (empty data too: it is one empty ``data:`` line) whose data, type and id are the inputs with line breaks in data normalised to LF, CR/LF/NUL stripped from
    type and id, and lone surrogates (which UTF-8 cannot carry) dropped; no other field
    (``retry``, a second ``id``) is ever injected."""
    frame = sse.event(data, event_type=event_type, event_id=event_id)
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n\n") == 1  # one blank line: one frame
    parser = StreamParser()
    parser.feed(frame)
    expected_data = _LINE.sub("\n", _sendable(data))
    expected_fields = ["id"] * (event_id is not None) + ["event"] * (event_type is not None)
    assert parser.fields_seen[: len(expected_fields)] == expected_fields
    assert set(parser.fields_seen[len(expected_fields) :]) <= {"data"}
    assert parser.retry is None
    [got] = parser.events
    assert got.data == expected_data
    assert got.event == ("" if event_type is None else _field_value(event_type))
    assert got.last_event_id == ("" if event_id is None else _field_value(event_id))


@PROPERTY
@given(data=st.binary(), event_type=st.none() | st.binary())
def test_a_bytes_frame_reads_back_as_one_event(data: bytes, event_type: bytes | None) -> None:
    """Rule: bytes are framed as they are (the hub frames validated payload bytes); the frame is
    still one event whose data is the bytes' text with line breaks normalised, and nothing else."""
    frame = sse.event(data, event_type=event_type)
    assert frame.count(b"\n\n") == 1
    parser = StreamParser()
    parser.feed(frame)
    assert parser.retry is None
    [got] = parser.events
    assert got.data == _LINE.sub("\n", data.decode("utf-8", errors="replace"))


@PROPERTY
@given(text=texts)
@example(text="\ud800")
@example(text="a\r\ndata: x\n\nid: 1")
def test_a_comment_frame_is_never_an_event_or_a_field(text: str) -> None:
    """Rule: ``sse.comment`` (the heartbeat) yields no event and no field, whatever its text."""
    frame = sse.comment(text)
    parser = StreamParser()
    parser.feed(frame)
    assert parser.events == []
    assert parser.fields_seen == []
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n\n") == 1
