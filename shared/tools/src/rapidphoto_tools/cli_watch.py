"""``rapidphoto watch``: live progress of sessions in the terminal (:mod:`rapidphoto_tools.realtime`).

    rapidphoto watch <session_id>... [--notifications] [--relay URL]... [--timeout SECONDS]

One stream for everything asked (the session's own stream for one session, else the
multi-session stream, PROTOCOL §5.1), drawn with rich: a bar per session with uploaded / failed /
total, the failed photos with their reasons, the notifications, and the connection's state
(reconnections are shown, with why and when the next attempt is). Exit status: 0 once every
session completed; 1 when a session or the stream was refused for good (the reason is printed:
``forbidden``, ``session-not-found``, ``token-expired``, ``unauthorized``, ...) or ``--timeout``
passed; 2 bad input. The token comes from ``RAPIDPHOTO_TOKEN``, else is minted for ``--user`` with
``JWT_SECRET`` like ``rapidphoto token`` (development stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import deque
from collections.abc import Sequence
from typing import Final

import attrs
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rapidphoto_contract.events import (
    STATUS_COMPLETED,
    Notification,
    PhotoFailed,
    PhotoUploaded,
    SessionClosed,
    SessionCompleted,
    SessionSnapshot,
    SessionStarted,
    progress_percent,
)
from rapidphoto_contract.ids import validate_id, validate_session_id
from rapidphoto_contract.settings import ListenConfig
from rapidphoto_tools.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    dev_token,
    error,
    float_between,
)
from rapidphoto_tools.realtime import (
    ConnectionState,
    OtherEvent,
    StateChange,
    StreamEvent,
    StreamRefused,
    stream,
)

TOKEN_ENV: Final = "RAPIDPHOTO_TOKEN"
#: What the view keeps: the most recent failures and notifications.
SHOWN_FAILURES: Final = 8
SHOWN_NOTIFICATIONS: Final = 5
BAR_WIDTH: Final = 40


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``watch`` to the subcommands ``sub``."""
    watch = sub.add_parser(
        "watch",
        help="live progress bars of sessions (and notifications) from a relay",
        description="Follow sessions on a relay until they complete: a progress bar each, the "
        "failed photos with their reasons, the notifications, the connection's state. Exit 0 "
        "when every session completed, 1 on a refusal (reason printed) or --timeout. The token "
        f"is ${TOKEN_ENV}, else a development token for --user (signed with JWT_SECRET).",
    )
    watch.add_argument("sessions", nargs="*", metavar="SESSION_ID")
    watch.add_argument("--notifications", action="store_true", help="also the user's notifications")
    watch.add_argument(
        "--relay",
        action="append",
        metavar="URL",
        help="relay base URL; repeat it to go round several on reconnection "
        "(default http://RELAY_HOST:RELAY_PORT)",
    )
    watch.add_argument(
        "--user", metavar="U", help=f"mint a development token for U (no ${TOKEN_ENV})"
    )
    watch.add_argument(
        "--timeout",
        type=float_between(0, 7 * 86_400, open_low=True),
        default=None,
        metavar="SECONDS",
        help="give up (exit 1) after this long (default: never)",
    )
    watch.set_defaults(run=_watch)


def _watch(args: argparse.Namespace) -> int:
    sessions = list(dict.fromkeys(validate_session_id(s, "session") for s in args.sessions))
    if not sessions and not args.notifications:
        error("nothing to watch: give session ids, or --notifications")
        return EXIT_USAGE
    token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        if args.user is None:
            error(f"no token: set {TOKEN_ENV}, or give --user to mint a development token")
            return EXIT_USAGE
        token = dev_token(validate_id("user", args.user))
    relays = args.relay or [_default_relay()]
    console = Console(stderr=False, highlight=False)
    return asyncio.run(
        watch(
            relays,
            token,
            sessions,
            notifications=args.notifications,
            console=console,
            give_up_after=args.timeout,
        )
    )


def _default_relay() -> str:
    listen = ListenConfig.from_env()
    return f"http://{listen.relay_host}:{listen.relay_port}"


@attrs.define
class SessionView:
    """What the screen shows of one session (counts are totals: each event replaces them)."""

    session_id: str
    total: int | None = None
    uploaded: int = 0
    failed: int = 0
    status: str = "waiting"
    closed: str | None = None  # the reason a multi-session stream went on without it

    @property
    def done(self) -> bool:
        return self.status == STATUS_COMPLETED or self.closed is not None


@attrs.define
class WatchView:
    """The state of the screen, fed with events and state changes; rich renders it."""

    sessions: dict[str, SessionView]
    notifications_asked: bool
    connection: ConnectionState = "connecting"
    connection_note: str = ""
    failures: deque[tuple[str, str, str]] = attrs.field(
        factory=lambda: deque(maxlen=SHOWN_FAILURES)
    )
    notifications: deque[str] = attrs.field(factory=lambda: deque(maxlen=SHOWN_NOTIFICATIONS))
    reconnections: int = 0

    @classmethod
    def of(cls, sessions: Sequence[str], notifications: bool) -> WatchView:
        return cls({s: SessionView(s) for s in sessions}, notifications)

    @property
    def all_done(self) -> bool:
        return bool(self.sessions) and all(s.done for s in self.sessions.values())

    def on_state(self, change: StateChange) -> None:
        self.connection = change.state
        if change.state == "reconnecting":
            self.reconnections += 1
            wait = f" in {change.retry_in:.1f} s" if change.retry_in is not None else ""
            self.connection_note = f"{change.reason or 'dropped'}; next try{wait} at {change.url}"
        elif change.state == "open":
            self.connection_note = change.url
        else:
            self.connection_note = change.reason or ""

    def on_event(self, event: StreamEvent) -> None:
        match event:
            case SessionSnapshot():
                view = self._session(event.session_id)
                self._counts(view, event.total_photos, event.uploaded_photos, event.failed_photos)
                view.status = event.status
                self._forget_failures(event.session_id)
                for failure in event.failures:
                    self.failures.append((event.session_id, failure.photo_id, failure.reason))
            case SessionStarted() | PhotoUploaded() | PhotoFailed() | SessionCompleted():
                view = self._session(event.session_id)
                self._counts(view, event.total_photos, event.uploaded_photos, event.failed_photos)
                view.status = event.status
                if isinstance(event, PhotoFailed):
                    self.failures.append((event.session_id, event.photo_id, event.reason))
                elif isinstance(event, PhotoUploaded):  # a failed photo uploaded after all
                    self._forget_failures(event.session_id, event.photo_id)
            case Notification():
                self.notifications.append(
                    f"{event.kind} {event.session_id}: {event.uploaded_photos} uploaded, "
                    f"{event.failed_photos} failed of {event.total_photos}"
                )
            case SessionClosed():
                self._session(event.session_id).closed = event.reason
            case OtherEvent():  # a direct publish of another backend: shown as it came
                self.notifications.append(f"{event.type}: {dict(event.payload)}")

    def _session(self, session_id: str) -> SessionView:
        return self.sessions.setdefault(session_id, SessionView(session_id))

    @staticmethod
    def _counts(view: SessionView, total: int, uploaded: int, failed: int) -> None:
        view.total, view.uploaded, view.failed = total, uploaded, failed

    def _forget_failures(self, session_id: str, photo_id: str | None = None) -> None:
        kept = [
            f
            for f in self.failures
            if f[0] != session_id or (photo_id is not None and f[1] != photo_id)
        ]
        self.failures.clear()
        self.failures.extend(kept)

    def __rich__(self) -> RenderableType:
        # The text columns never wrap (scripts and tests read them); the bar takes what is left,
        # at most BAR_WIDTH.
        bars = Table.grid(padding=(0, 1))
        bars.add_column(no_wrap=True)
        bars.add_column(max_width=BAR_WIDTH)
        bars.add_column(no_wrap=True)
        bars.add_column(no_wrap=True)
        for view in self.sessions.values():
            if view.closed is not None:
                bar: RenderableType = Text(f"closed: {view.closed}", style="red")
                counts = ""
            else:
                done = view.uploaded + view.failed
                bar = ProgressBar(total=view.total, completed=done)
                total = "?" if view.total is None else str(view.total)
                percent = (
                    ""
                    if view.total is None
                    else f"{progress_percent(view.uploaded, view.failed, view.total):3d}%  "
                )
                counts = f"{percent}{done}/{total}  {view.uploaded} uploaded, {view.failed} failed"
            status = Text(view.status, style="green" if view.status == STATUS_COMPLETED else "")
            bars.add_row(Text(view.session_id, style="bold"), bar, counts, status)
        parts: list[RenderableType] = [bars]
        if self.failures:
            parts.append(Text("failed photos:", style="yellow"))
            for session_id, photo_id, reason in self.failures:
                parts.append(Text(f"  {session_id} {photo_id}: {reason}"))
        if self.notifications_asked or self.notifications:
            parts.append(Text("notifications:", style="cyan"))
            parts.extend(Text(f"  {line}") for line in self.notifications)
        style = {"open": "green", "reconnecting": "yellow", "error": "red"}.get(self.connection, "")
        line = Text("connection: ")
        line.append(self.connection, style=style)
        if self.connection_note:
            line.append(f" ({self.connection_note})")
        if self.reconnections:
            line.append(f"  reconnections: {self.reconnections}")
        parts.append(line)
        return Group(*parts)


async def watch(
    relays: Sequence[str],
    token: str,
    sessions: Sequence[str],
    *,
    notifications: bool,
    console: Console,
    give_up_after: float | None = None,
) -> int:
    """Show the sessions until they are done; the exit status."""
    view = WatchView.of(sessions, notifications)
    events = stream(
        list(relays),
        token=token,
        sessions=sessions,
        notifications=notifications,
        on_state=view.on_state,
    )
    failure: str | None = None
    with Live(view, console=console, refresh_per_second=8, transient=False):
        try:
            async with asyncio.timeout(give_up_after), events:
                async for event in events:
                    view.on_event(event)
                    if view.all_done and notifications:
                        break  # the notifications alone would keep the stream open
        except StreamRefused as refused:
            failure = f"refused: {refused.reason}"
            if refused.detail:
                failure += f" ({refused.detail})"
            view.connection_note = failure
        except TimeoutError:
            failure = f"timed out after {give_up_after:g} s"
    if failure is not None:
        error(failure)
        return EXIT_FAILED
    closed = [v for v in view.sessions.values() if v.closed is not None]
    for v in closed:
        error(f"session {v.session_id}: {v.closed}")
    if closed:
        return EXIT_FAILED
    if sessions:
        console.print(f"all {len(view.sessions)} session(s) completed")
    return EXIT_OK
