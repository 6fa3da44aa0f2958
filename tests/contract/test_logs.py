"""rapidphoto_contract.logs: the product's log line, one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys

from rapidphoto_contract.logs import FIELDS, JsonFormatter, Throttle


def record(
    msg: str, *args: object, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("rapidphoto.test", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_line_is_one_json_object_with_the_fields() -> None:
    line = JsonFormatter().format(record("job %s", "applied", fields={"job_id": "j1", "try": 2}))

    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "job applied"
    assert data["level"] == "info"
    assert data["logger"] == "rapidphoto.test"
    assert (data["job_id"], data["try"]) == ("j1", 2)
    assert data["ts"].endswith("+00:00")


def test_a_traceback_stays_on_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)

    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_fields_key_is_the_documented_one() -> None:
    assert FIELDS == "fields"


def test_other_extra_keys_are_fields_as_they_are() -> None:
    """The relay's way: ``extra={"channel": ..., "error": ...}``; private and standard ones stay out."""
    line = JsonFormatter().format(record("lost", channel="c1", error=ValueError("x"), _private=1))

    data = json.loads(line)
    assert (data["channel"], data["error"]) == ("c1", "x")
    assert set(data) == {"ts", "level", "logger", "msg", "channel", "error"}


def test_a_fields_value_that_is_not_a_mapping_stays_one_field() -> None:
    data = json.loads(JsonFormatter().format(record("x", fields=["a", "b"])))
    assert data["fields"] == ["a", "b"]


def test_a_throttle_says_one_line_per_interval_with_the_count_since_the_last() -> None:
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.hit() == 1  # the first occurrence is always told
    assert [throttle.hit() for _ in range(500)] == [None] * 500
    now[0] += 9.9
    assert throttle.hit() is None
    now[0] += 0.1
    assert throttle.hit() == 502  # everything since the last line, this one included
    assert throttle.hit() is None


def test_timestamps_are_utc_milliseconds_across_seconds() -> None:
    """The formatter formats the date once per second: each line still has its own time."""
    import datetime as dt

    formatter = JsonFormatter()
    for created in (1764213600.0, 1764213600.5, 1764213600.999, 1764213601.001, 1764213599.25):
        rec = record("x")
        rec.created = created
        expected = dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(rec))["ts"] == expected
