"""rapidphoto_worker.logs: the product's JSON line on stderr; arq's per-job lines dropped."""

from __future__ import annotations

import logging

import pytest

from rapidphoto_contract.logs import JsonFormatter
from rapidphoto_worker.logs import DropArqJobLines, configure_logging


def record(
    msg: str, *args: object, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("arq.worker", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_arq_per_job_lines_are_dropped_but_not_max_retries() -> None:
    keep = DropArqJobLines().filter
    assert not keep(record("%6.2fs → %s(%s)%s", 0.1, "j:f", "", ""))
    assert not keep(record("%6.2fs ! %s failed, %s: %s", 0.1, "j:f", "X", "y", level=40))
    assert keep(record("%6.2fs ! %s max retries %d exceeded", 0.1, "j:f", 30, level=30))
    assert keep(record("Starting worker for %d functions: %s", 3, "a, b, c"))


def test_configure_logging_writes_the_contract_line(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging()
    [handler] = root.handlers
    assert type(handler.formatter) is JsonFormatter
    assert any(isinstance(f, DropArqJobLines) for f in logging.getLogger("arq.worker").filters)
