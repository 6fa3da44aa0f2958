"""What both hubs (``hub.py``, standalone; ``cluster_hub.py``, Redis Cluster) do with a channel
message: validate and frame it once (``payload.py``), push the one :class:`Message` to every local
subscriber of its channel, count it; and drop what breaks PROTOCOL §4 (counted, logged at most once
per ``DROP_LOG_INTERVAL`` so a flood cannot flood the logs), never failing the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Final, Protocol

from rapidphoto_contract.logs import Throttle
from rapidphoto_relay.metrics import RelayMetrics
from rapidphoto_relay.payload import InvalidPayload, Message, parse_payload

#: At most one "dropped payload" log line per this many seconds.
DROP_LOG_INTERVAL: Final = 1.0


class Subscriber(Protocol):
    """What a hub feeds: a stream's writer, or one lane of a multi-session stream
    (``multi_writer.Lane``). Both calls must return at once and never raise."""

    def push(self, message: Message) -> None: ...

    def request_resync(self) -> None: ...


class Fanout:
    def __init__(self, metrics: RelayMetrics, log: logging.Logger) -> None:
        self._metrics = metrics
        self._log = log
        self._drop_log = Throttle(DROP_LOG_INTERVAL)

    def deliver(self, subscribers: Collection[Subscriber], channel: bytes, data: bytes) -> None:
        """Frame ``data`` once and push it to every subscriber, or drop it (PROTOCOL §4)."""
        try:
            message = parse_payload(data)
        except InvalidPayload as exc:
            self.dropped(channel, data, exc.reason)
            return
        for subscriber in subscribers:
            subscriber.push(message)
        self._metrics.events_delivered.inc(len(subscribers))

    def failed(self, reply: Any, kind: bytes) -> None:
        """A reply whose handling raised: a bug, or an input no rule foresaw. Dropped and counted
        as ``internal``, logged with its traceback (rate limited like any drop). ``kind`` is the
        reply type of a message (``message``, or ``smessage`` on a cluster)."""
        is_message = isinstance(reply, list) and len(reply) == 3 and reply[0] == kind
        channel = reply[1] if is_message and isinstance(reply[1], bytes) else b"?"
        data = reply[2] if is_message and isinstance(reply[2], bytes) else b""
        self.dropped(channel, data, "internal", exc_info=True)

    def dropped(self, channel: bytes, data: bytes, reason: str, *, exc_info: bool = False) -> None:
        self._metrics.events_dropped.labels(reason).inc()
        count = self._drop_log.hit()
        if count is not None:
            self._log.warning(
                "dropped invalid channel payload",
                extra={
                    "channel": channel.decode(errors="replace"),
                    "reason": reason,
                    "bytes": len(data),
                    "dropped_since_last_line": count,
                },
                exc_info=exc_info,
            )
