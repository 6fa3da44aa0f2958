"""The product's log line: one JSON object per line, fields rather than prose (relay and worker).

Every process formats its records with :class:`JsonFormatter`: ``ts`` (UTC, ms), ``level``,
``logger``, ``msg``, then the record's own fields, then ``exc`` (a traceback, on the same line).
A record's fields are what it was given with ``extra=``: each key of ``extra={FIELDS: {...}}`` (the
worker's way), or any other ``extra`` key as it is (the relay's way). Standard library only: each
process adds its own specifics (the relay's token redaction, the worker's arq filter).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

#: ``logger.info(msg, extra={FIELDS: {...}})`` adds those fields to the line.
FIELDS: Final = "fields"

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
#: (``color_message`` is uvicorn's copy of the message with terminal colours.)
STANDARD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "color_message", "taskName"}


#: How many attributes ``LogRecord.__init__`` sets: a record's ``extra=`` keys come after them.
_INIT_ATTRIBUTES: Final = len(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module).

    Written for a relay that logs each stream it opens (thousands a second in a reconnection
    storm): the timestamp's date and time are formatted once per second, and only the attributes
    added after ``LogRecord.__init__`` are looked at for fields.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        # As datetime does: the time rounded to the microsecond, then cut to the millisecond.
        micro = round((created - second) * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            self._second_text = dt.datetime.fromtimestamp(second, dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            self._second = second
        return f"{self._second_text}.{micro // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        attributes = record.__dict__
        if len(attributes) > _INIT_ATTRIBUTES:
            for key in itertools.islice(attributes, _INIT_ATTRIBUTES, None):
                if key in STANDARD_ATTRIBUTES or key.startswith("_"):
                    continue
                value = attributes[key]
                if key == FIELDS and isinstance(value, Mapping):
                    out.update(value)
                else:
                    out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class Throttle:
    """One log line per ``interval`` seconds about something that may happen thousands of times a
    second (a flood of bad payloads, of half-sent requests, a Redis out of memory): each
    :meth:`hit` counts one occurrence, and returns how many there were since the last line when a
    line is due, else ``None``."""

    __slots__ = ("_clock", "_count", "_last", "interval")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._count = 0
        self._last = -float("inf")

    def hit(self) -> int | None:
        self._count += 1
        now = self._clock()
        if now - self._last < self.interval:
            return None
        count, self._count, self._last = self._count, 0, now
        return count
