"""Connections before they carry a request: a deadline for the request head and a cap on their number.

uvicorn bounds neither. Its keep-alive timer starts only after a response and is cancelled by any
byte received, so a connection that was opened and sent nothing, or sent part of a request head
(``GET … HTTP/1.1`` and one header) and then nothing, is held for as long as the client likes, and
no limit counts it (``RELAY_MAX_CONNECTIONS`` counts streams, which a head never became). Thousands
of them used up the relay's file descriptors and locked everyone out (issue 9, fault 4). uvicorn has
no setting for this (a request-start timeout has been on its wish list since 2018), and
``limit_concurrency`` would not do: it answers 503 to new *requests* once that many connections are
open, long-lived streams included, so it caps streams, not the connections that are waiting.

A connection *waits* from the moment it is accepted until its request head is complete, and again
from the end of each response until the next head is complete (an idle keep-alive connection).
While it waits:

- **Deadline.** It must complete its request head within ``RELAY_REQUEST_HEAD_TIMEOUT_SECONDS`` of
  starting to wait, or it is closed: with ``408 Request Timeout`` (RFC 9110 §15.5.9) when part of a
  head has arrived, silently when nothing has (an idle connection, like uvicorn's own keep-alive
  timeout: an answer there could cross a request the client is sending at that moment).
- **Cap.** At most ``RELAY_MAX_PENDING_CONNECTIONS`` wait at once. A new connection beyond the cap
  makes the relay close the one that has waited longest, without an answer (a browser's
  ``EventSource`` retries after a network error but gives up on any non-200 answer). Refusing the
  *new* connection instead would let anyone lock every new user out by holding the cap's worth of
  half-sent heads, renewed once per deadline (1,000 connections every 5 s); closing the oldest means
  pushing out a real client, whose head arrives within a round trip of connecting, takes the cap's
  worth of new connections within that round trip. A well-formed request therefore gets through
  while the cap is full. The default cap (5,000) is above the listen backlog (4,096), so one burst
  of accepts in a reconnection storm, whose heads are already in the kernel's buffers but not yet
  read, never closes any of them.

A connection stops waiting when its head is complete: a stream counts toward ``RELAY_MAX_CONNECTIONS``
from then on, and never toward this cap. So the relay's descriptors are bounded by the two limits
together (:func:`raise_open_files_limit` checks them against ``RLIMIT_NOFILE`` at start-up).

The seam is the one uvicorn documents for its own protocols: ``uvicorn.Config(http=<class>)`` takes an
``asyncio.Protocol`` class. :class:`HeadDeadlineProtocol` subclasses uvicorn's httptools protocol and
extends five of its methods, each calling uvicorn's own: ``connection_made`` / ``connection_lost``
(the transport's callbacks), ``on_message_begin`` / ``on_headers_complete`` (the parser's callbacks)
and ``on_response_complete`` (what a request cycle calls when its response has been sent); it reads
only ``pipeline``, ``transport`` and ``loop``. ``tests/relay/test_connections.py`` drives all of it
through a real relay process, so a uvicorn upgrade that moves these fails there, not in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from typing import ClassVar, Final, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rapidphoto_contract.logs import Throttle
from rapidphoto_relay.metrics import RelayMetrics

log = logging.getLogger("rapidphoto_relay.connections")

#: Why a waiting connection was closed (the ``reason`` label of ``connections_closed``).
DropReason = Literal["head-timeout", "pending-limit"]

#: Descriptors besides streams and waiting connections: the listener, Redis connections, stdio, logs,
#: short requests in flight.
FD_RESERVE: Final = 256
#: At most one warning per reason this often while connections are being closed.
LOG_INTERVAL_SECONDS: Final = 10.0

_TIMEOUT_BODY: Final = json.dumps({"error": "request head not received in time"}).encode()
#: Written straight to the transport: the request never reached the app (the same JSON error shape).
_REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class PendingConnections:
    """The connections waiting for a request head, longest-waiting first, at most ``limit``."""

    def __init__(
        self, head_timeout: float, limit: int, metrics: RelayMetrics | None = None
    ) -> None:
        self.head_timeout = head_timeout
        self.limit = limit
        # An OrderedDict, not a dict: closing the oldest must stay O(1) however many were removed.
        self._waiting: OrderedDict[HeadDeadlineProtocol, None] = OrderedDict()
        self._metrics = metrics
        self._log: dict[DropReason, Throttle] = {
            "head-timeout": Throttle(LOG_INTERVAL_SECONDS),
            "pending-limit": Throttle(LOG_INTERVAL_SECONDS),
        }
        if metrics is not None:
            metrics.pending_connections.set_function(lambda: len(self._waiting))

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self, conn: HeadDeadlineProtocol) -> None:
        """``conn`` now waits for a request head: start its deadline, make room under the cap."""
        self._waiting.pop(conn, None)  # (never there already; if it were, it must not evict itself)
        while len(self._waiting) >= self.limit:
            oldest, _ = self._waiting.popitem(last=False)
            oldest.cancel_head_deadline()
            oldest.transport.close()
            self._closed("pending-limit")
        self._waiting[conn] = None
        conn.start_head_deadline(self.head_timeout)

    def done(self, conn: HeadDeadlineProtocol) -> None:
        """``conn`` has a complete request head, or is gone."""
        self._waiting.pop(conn, None)
        conn.cancel_head_deadline()

    def timed_out(self, conn: HeadDeadlineProtocol) -> None:
        self._waiting.pop(conn, None)
        self._closed("head-timeout")

    def _closed(self, reason: DropReason) -> None:
        if self._metrics is not None:
            self._metrics.connections_closed.labels(reason).inc()
        # Under a flood this runs thousands of times a second: one line per interval, with a count.
        count = self._log[reason].hit()
        if count is not None:
            log.warning(
                "closed %d connection(s) waiting for a request head (%s) since the last such line",
                count,
                reason,
                extra={"reason": reason, "pending": len(self._waiting)},
            )


class HeadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, counted in :class:`PendingConnections` while it waits.

    Use :func:`protocol_class` to get one bound to a :class:`PendingConnections`.
    """

    pending: ClassVar[PendingConnections]

    # Slots, not instance attributes: uvicorn's protocol keeps its state in an instance dict, and
    # two more keys there made that dict grow to its next size, 1.3 KiB more for every open stream.
    __slots__ = ("_head_started", "_head_timer")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        #: Part of a request head has arrived and not all of it (the parser began a message).
        self._head_started = False
        super().connection_made(transport)
        self.pending.wait(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pending.done(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._head_started = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        # Before uvicorn starts the request: from here on a stream is counted by the app's limits.
        self._head_started = False
        self.pending.done(self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # With a pipelined request queued, uvicorn starts it now: the connection does not wait.
        idle = not self.pipeline
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self.pending.wait(self)

    def start_head_deadline(self, seconds: float) -> None:
        self.cancel_head_deadline()
        self._head_timer = self.loop.call_later(seconds, self._head_deadline_passed)

    def cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        self.pending.timed_out(self)
        if self.transport.is_closing():
            return
        if self._head_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def protocol_class(pending: PendingConnections) -> type[HeadDeadlineProtocol]:
    """The class to pass as ``uvicorn.Config(http=...)``: one per server, sharing ``pending``."""

    class RelayHttpProtocol(HeadDeadlineProtocol):
        pass

    RelayHttpProtocol.pending = pending
    return RelayHttpProtocol


def raise_open_files_limit(needed: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; warn if ``needed`` still does not fit.

    Many systems start processes with a soft limit of 1,024 and a far higher hard limit, which a
    process may raise itself to; each stream and each waiting connection holds one descriptor.
    Returns the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
    log.info("open files limit %d (hard %s), about %d needed", soft, hard, needed)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open files limit %d is below the %d that RELAY_MAX_CONNECTIONS and"
            " RELAY_MAX_PENDING_CONNECTIONS may use: raise the limit (ulimit -n) or lower them",
            soft,
            needed,
        )
    return soft
