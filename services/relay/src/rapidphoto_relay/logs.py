"""Logging: one JSON object per line, with ``access_token`` redacted from everything.

EventSource clients pass their token in the query string (PROTOCOL §5), and uvicorn's access log prints
the path *with* the query string, as may any error message that quotes a URL. So redaction is done
twice: a filter rewrites each record's message before any handler sees it, and the formatter
scrubs the final line (exception text and extra fields included) before it is written.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

from rapidphoto_contract import logs

_TOKEN_IN_TEXT: Final = re.compile(r"(access_token=)[^&\s\"'#]*", re.IGNORECASE)
REDACTED: Final = r"\1[REDACTED]"


def redact(text: str) -> str:
    return (
        _TOKEN_IN_TEXT.sub(REDACTED, text)
        if "ccess_token" in text or "CCESS_TOKEN" in text
        else text
    )


class RedactTokens(logging.Filter):
    """Rewrites the record's message with ``access_token`` values redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logs.JsonFormatter):
    """The product's JSON line (:mod:`rapidphoto_contract.logs`), scrubbed of ``access_token``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def lean_records() -> None:
    """Records without what no relay line shows: the caller's file and line (a walk up the stack
    per record), the thread, the process and its name (a ``getpid()`` per record). About a third of
    the cost of a log line, and the relay writes two per stream opened (``docs/performance.md``).
    The logging module's documented switches, for this process."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the relay and uvicorn (passed as uvicorn's log_config)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactTokens}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {
                "handlers": ["stderr"],
                "level": level,
                "propagate": False,
                "filters": ["redact"],
            },
        },
        "root": {"handlers": ["stderr"], "level": level},
    }
