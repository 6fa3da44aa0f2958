"""rapidphoto_worker.logs: one JSON object per line; arq's per-job lines dropped."""

from __future__ import annotations

import json
import logging
import sys

from rapidphoto_worker.logs import FIELDS, DropArqJobLines, JsonFormatter


def record(
    msg: str, *args: object, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("arq.worker", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_line_is_one_json_object_with_the_fields() -> None:
    line = JsonFormatter().format(record("job %s", "applied", fields={"job_id": "j1", "try": 2}))

    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "job applied"
    assert data["level"] == "info"
    assert data["logger"] == "arq.worker"
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


def test_arq_per_job_lines_are_dropped_but_not_max_retries() -> None:
    keep = DropArqJobLines().filter
    assert not keep(record("%6.2fs → %s(%s)%s", 0.1, "j:f", "", ""))
    assert not keep(record("%6.2fs ! %s failed, %s: %s", 0.1, "j:f", "X", "y", level=40))
    assert keep(record("%6.2fs ! %s max retries %d exceeded", 0.1, "j:f", 30, level=30))
    assert keep(record("Starting worker for %d functions: %s", 3, "a, b, c"))


def test_fields_key_is_the_documented_one() -> None:
    assert FIELDS == "fields"
