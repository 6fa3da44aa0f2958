"""One function per command (PROTOCOL §3): check, run the command's Lua script, map its reply.

The job functions in :mod:`rapidphoto_worker.main` parse a job's arguments with the contract and call
these. Each returns a :class:`CommandResult` (``applied``, or ``duplicate`` when nothing changed) or
raises:

- a :class:`~rapidphoto_worker.errors.CommandError` (``SessionConflict``, ``TooManyPhotos``,
  ``SessionNotFound``) or ``InvalidCommand``: final, the job fails and nothing changed;
- ``arq.Retry``: try the job again later, for transient Redis errors and for photo jobs whose session
  has not been started yet (jobs can overtake each other across workers).

The scripts do all the deciding atomically, each on the keys of one slot (PROTOCOL §9). A photo
command that completes a session therefore runs in steps: (1) the photo script (the session's slot)
records the photo, publishes its event and ``SESSION_COMPLETED``, and marks the owner's notification
pending, atomically; (2) ``notify_session_completed`` (the owner's slot) writes and publishes the
notification unless its record says it did already; (3) ``clear_completion`` (the session's slot)
removes the mark. A worker that dies anywhere in between leaves the mark, which the retried job
(its photo script is then a duplicate, but it reports the mark) or any later photo command of the
session sees, and finishes: the notification is written exactly once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs
from arq import Retry
from redis import exceptions as redis_errors

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import (
    CompletePhotoUpload,
    FailPhotoUpload,
    StartUploadSession,
)
from rapidphoto_worker.context import WorkerContext
from rapidphoto_worker.errors import SessionConflict, SessionNotFound, TooManyPhotos

# --- retries -------------------------------------------------------------------------------------

#: Worth retrying: the server is unreachable, slow, still loading its data set after a restart
#: (BusyLoadingError is a ConnectionError), a replica during a fail-over, a cluster slot moving or
#: a cluster fail-over under way (CLUSTERDOWN), too few replicas confirming a write in time
#: (state.ReplicationTimeout, a TimeoutError), or out of memory (``maxmemory`` with ``noeviction``
#: refuses a script before it runs, so nothing changed; memory is freed by expiring sessions or an
#: operator).
TRANSIENT_ERRORS: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.OutOfMemoryError,
)
#: ConnectionError subclasses that a retry will not fix: wrong credentials or ACL rules.
PERMANENT_ERRORS: Final = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)

#: arq's ``max_tries`` for our jobs. On the last try a transient error is left to fail the job, so its
#: result names the real error. At the backoff cap this is about a minute of retrying an outage.
MAX_TRIES: Final = 30

#: Backoff before try n+1 is min(CAP, BASE * 2^(n-1)) times a random factor in [MIN_JITTER, 1]:
#: quick first retries (a session start that is a few ms behind), then at most 2 s between tries.
#: The jitter spreads out the retries of jobs that failed together.
BACKOFF_BASE_SECONDS: Final = 0.05
BACKOFF_CAP_SECONDS: Final = 2.0
BACKOFF_MIN_JITTER: Final = 0.8

#: PROTOCOL §3: a photo job whose session does not exist yet is retried "for at least 10 s". Read at call
#: time, so tests may lower it. Counted from the job's *first try*, not from when it was enqueued: a
#: job that sat in a long queue still gets the full window. arq keeps no first-try time, so we use a
#: lower bound that needs no extra state: the sum of the smallest delays the backoff can have given
#: the job so far (:func:`min_waited_seconds`). In practice the job gives up after about 12 s.
SESSION_WAIT_SECONDS: float = 10.0


def _nominal_backoff(job_try: int) -> float:
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** min(job_try - 1, 32))


def backoff_seconds(job_try: int) -> float:
    """How long to defer the next try after try number ``job_try`` (1-based) failed."""
    return _nominal_backoff(job_try) * random.uniform(BACKOFF_MIN_JITTER, 1.0)


def min_waited_seconds(job_try: int) -> float:
    """A lower bound of the time since the first try, when this is try number ``job_try``."""
    return sum(_nominal_backoff(n) * BACKOFF_MIN_JITTER for n in range(1, job_try))


@contextlib.contextmanager
def _retry_transient(job_try: int) -> Iterator[None]:
    """Turn a transient Redis error into ``arq.Retry``. Safe: every script is idempotent."""
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        if isinstance(exc, PERMANENT_ERRORS) or job_try >= MAX_TRIES:
            raise
        raise Retry(defer=backoff_seconds(job_try)) from exc


def _session_missing(session_id: str, job_try: int) -> Exception:
    waited = min_waited_seconds(job_try)
    if waited < SESSION_WAIT_SECONDS:
        return Retry(defer=backoff_seconds(job_try))
    return SessionNotFound(
        f"session {session_id!r} does not exist: start_upload_session was not run "
        f"(gave up after {job_try} tries over at least {waited:.0f} s); nothing changed"
    )


# --- results -------------------------------------------------------------------------------------

Outcome: TypeAlias = Literal["applied", "duplicate"]


@attrs.frozen(kw_only=True)
class CommandResult:
    """What a command did. ``duplicate``: nothing changed and nothing was published."""

    outcome: Outcome
    #: Entries appended to the session's log, oldest first (the photo event, then SESSION_COMPLETED).
    event_ids: tuple[str, ...] = ()
    #: The notification of the session's completion, when this command completed the session or
    #: found its notification pending (and wrote it, or found it written by another).
    notification_id: str | None = None

    @property
    def completed(self) -> bool:
        return self.notification_id is not None

    def to_dict(self) -> dict[str, Any]:
        """The job's result as arq stores it (JSON, camelCase like the events)."""
        out: dict[str, Any] = {"outcome": self.outcome, "eventIds": list(self.event_ids)}
        if self.notification_id is not None:
            out["notificationId"] = self.notification_id
        return out


DUPLICATE: Final = CommandResult(outcome="duplicate")


def _reply(raw: object) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise RuntimeError(f"unexpected script reply {raw!r}")
    return raw


def _applied(reply: Sequence[str]) -> CommandResult:
    # {'applied', session event id} of start_upload_session
    return CommandResult(outcome="applied", event_ids=tuple(reply[1:]))


# --- the commands --------------------------------------------------------------------------------


def occurred_at(now: dt.datetime | None = None) -> str:
    """``occurredAt`` of an event: RFC 3339, UTC, milliseconds, e.g. ``2026-11-27T03:35:59.123Z``."""
    t = dt.datetime.now(dt.UTC) if now is None else now.astimezone(dt.UTC)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"


async def start_upload_session(
    app: WorkerContext, cmd: StartUploadSession, job_try: int = 1
) -> CommandResult:
    """Create the session and publish ``SESSION_STARTED``; same owner and total again: duplicate."""
    settings = app.settings
    with _retry_transient(job_try):
        raw = await app.state.run(
            app.scripts.start_upload_session,
            keys.session_keys(cmd.session_id),
            [
                app.state.publish,
                cmd.session_id,
                cmd.user_id,
                cmd.total_photos,
                occurred_at(),
                settings.session_log_maxlen,
                settings.session_ttl_seconds,
                keys.session_channel(cmd.session_id),
            ],
        )
    reply = _reply(raw)
    if reply[0] == "applied":
        return _applied(reply)
    if reply[0] == "duplicate":
        return DUPLICATE
    if reply[0] == "conflict":
        raise SessionConflict(
            f"session {cmd.session_id!r} already exists with another owner or total_photos; "
            "nothing changed"
        )
    raise RuntimeError(f"unexpected script reply {reply!r}")


def _photo_args(app: WorkerContext, session_id: str, photo_id: str) -> list[str | int]:
    """The ARGV prefix shared by the photo scripts (see ``photo_args`` in lib.lua)."""
    settings = app.settings
    return [
        app.state.publish,
        session_id,
        photo_id,
        occurred_at(),
        settings.session_log_maxlen,
        settings.session_ttl_seconds,
        keys.session_channel(session_id),
    ]


async def _photo_command(
    app: WorkerContext, session_id: str, photo_id: str, job_try: int, script: Any, extra: list[str]
) -> CommandResult:
    """Run a photo script, then, if the session's notification is pending, the completion's steps."""
    with _retry_transient(job_try):
        raw = await app.state.run(
            script, keys.session_keys(session_id), [*_photo_args(app, session_id, photo_id), *extra]
        )
        reply = _reply(raw)
        status = reply[0]
        if status == "too_many":
            raise TooManyPhotos(
                f"session {session_id!r} already has total_photos distinct photos; "
                f"photo {photo_id!r} would be one more; nothing changed"
            )
        if status == "not_found":  # never started, or expired
            raise _session_missing(session_id, job_try)
        if status not in ("applied", "duplicate"):
            raise RuntimeError(f"unexpected script reply {reply!r}")
        outcome: Outcome = "applied" if status == "applied" else "duplicate"
        # {status, owner, pending notification or '', event ids...}
        owner, pending, event_ids = reply[1], reply[2], tuple(reply[3:])
        notification_id = await _notify(app, session_id, owner, pending) if pending else None
    return CommandResult(outcome=outcome, event_ids=event_ids, notification_id=notification_id)


async def _notify(app: WorkerContext, session_id: str, owner: str, pending: str) -> str:
    """The completion's steps 2 and 3 (module docstring): the notification id."""
    notification_id = await _notify_step(app, session_id, owner, pending)
    await app.state.run(app.scripts.clear_completion, keys.session_keys(session_id), [pending])
    return notification_id


async def _notify_step(app: WorkerContext, session_id: str, owner: str, pending: str) -> str:
    """The completion's step 2: write the notification (once): its id."""
    completed_id, when, total, uploaded, failed = pending.split(" ")
    raw = await app.state.run(
        app.scripts.notify_session_completed,
        [
            keys.user_notifications_log_key(owner),
            keys.session_completion_key(owner, session_id),
        ],
        [
            app.state.publish,
            owner,
            session_id,
            completed_id,
            when,
            total,
            uploaded,
            failed,
            app.settings.session_log_maxlen,
            app.settings.session_ttl_seconds,
            keys.notification_channel(owner),
        ],
    )
    reply = _reply(raw)
    if reply[0] not in ("applied", "duplicate"):
        raise RuntimeError(f"unexpected script reply {reply!r}")
    return reply[1]


async def complete_photo_upload(
    app: WorkerContext, cmd: CompletePhotoUpload, job_try: int = 1
) -> CommandResult:
    """Mark the photo uploaded (moving it out of the failures if it had failed), publish it."""
    return await _photo_command(
        app, cmd.session_id, cmd.photo_id, job_try, app.scripts.complete_photo_upload, []
    )


def _reason_json(reason: str) -> str:
    # The reason is free text, so Python encodes it, with the contract's JSON settings: Lua's cjson
    # escapes some characters differently (e.g. "/" and DEL), and the published bytes must be exactly
    # what rapidphoto_contract.events would produce. It is valid UTF-8 text: FailPhotoUpload.parse,
    # which every job goes through (main.py), refuses a lone surrogate.
    return json.dumps(reason, ensure_ascii=False)


async def fail_photo_upload(
    app: WorkerContext, cmd: FailPhotoUpload, job_try: int = 1
) -> CommandResult:
    """Mark the photo failed and publish it; a photo already uploaded or failed: duplicate."""
    return await _photo_command(
        app,
        cmd.session_id,
        cmd.photo_id,
        job_try,
        app.scripts.fail_photo_upload,
        [cmd.reason, _reason_json(cmd.reason)],
    )
