"""Logging: one JSON object per line, with ``access_token`` redacted from everything.

EventSource clients pass their token in the query string (PROTOCOL §5), and uvicorn's access log prints
the path *with* the query string, as may any error message that quotes a URL. So redaction is done
twice: a filter rewrites each record's message before any handler sees it, and the formatter
scrubs the final line (exception text and extra fields included) before it is written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any, Final

_TOKEN_IN_TEXT: Final = re.compile(r"(access_token=)[^&\s\"'#]*", re.IGNORECASE)
REDACTED: Final = r"\1[REDACTED]"

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "color_message", "taskName"}


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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str, ensure_ascii=False))


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
