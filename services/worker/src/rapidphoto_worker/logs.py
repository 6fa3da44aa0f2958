"""Structured logs: one JSON object per line on stderr, fields rather than prose.

A job ends with exactly one line from :mod:`rapidphoto_worker.main` (``job`` = name, ``outcome`` =
``applied`` | ``duplicate`` | ``retry`` | ``failed``, ids, timing). arq's own per-job lines say the same
with less detail (and, for the failures we expect, such as bad arguments, a traceback), so arq's
worker logger is set to WARNING, which also spares building two records per job, and its per-job
failure lines are dropped; its warnings (such as "max retries exceeded", logged before our job
function runs) are kept. The line itself is the product's (:mod:`rapidphoto_contract.logs`), with
fields given as ``extra={FIELDS: {...}}``. Nothing secret is logged: no Redis URL (it may hold a
password), no failure reasons (user text).
"""

from __future__ import annotations

import logging
import sys

from rapidphoto_contract.logs import JsonFormatter


class DropArqJobLines(logging.Filter):
    """Drop arq's per-job lines (all start with a ``%6.2fs`` duration), which repeat ours, except
    "max retries exceeded", which is logged before our job function runs and so has no line of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (isinstance(msg, str) and msg.startswith("%6.2fs") and "max retries" not in msg)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    arq_worker = logging.getLogger("arq.worker")
    arq_worker.setLevel(logging.WARNING)
    if not any(isinstance(f, DropArqJobLines) for f in arq_worker.filters):
        arq_worker.addFilter(DropArqJobLines())
