"""Every Redis key and channel name the project uses, built here and nowhere else (CONVENTIONS §2).

Layout (``<sid>`` a session id, ``<uid>`` a user id; both validated, so they cannot contain ``:``,
``{`` or ``}``):

- ``upload-session:<sid>`` / ``user-notifications:<uid>``: pub/sub channels, named by PROTOCOL §4.
- ``rapidphoto:{upload-session:<sid>}:state``: hash with the session's owner, total, counts, status.
- ``rapidphoto:{upload-session:<sid>}:photos``: hash photo id -> ``U`` (uploaded) or ``F:<reason>``.
- ``rapidphoto:{upload-session:<sid>}:failures``: sorted set of current failures by failure order.
- ``rapidphoto:{upload-session:<sid>}:log``: the session's event log, a Redis Stream.
- ``rapidphoto:{user-notifications:<uid>}:notifications``: the user's notification log, a Stream.
- ``rapidphoto:{user-notifications:<uid>}:completed:<sid>``: the notification written for one
  completed session (what makes the completion's second step idempotent, PROTOCOL §9).

The part in braces is a Redis Cluster hash tag (PROTOCOL §9): only it is hashed, so a session's keys
share one slot, and, the tag being the channel's name, so does its (sharded) channel; likewise a
user's keys and channel. One script can then read and write a session's keys and publish on its
channel atomically on a cluster, where a script may only touch one slot. Standalone Redis ignores
the braces. All data keys share the ``rapidphoto:`` prefix so an operator can find (and account for)
them with ``SCAN MATCH rapidphoto:*`` and they never collide with arq's ``arq:*`` keys.
"""

from __future__ import annotations

from typing import Final

#: Prefix of every data key we own (not the channels, whose names PROTOCOL §4 fixes).
KEY_PREFIX: Final = "rapidphoto"

#: PROTOCOL §4: anyone may publish here; the relay subscribes per open stream.
SESSION_CHANNEL_PREFIX: Final = "upload-session:"
#: PROTOCOL §4: the owner's notifications (session completed).
NOTIFICATION_CHANNEL_PREFIX: Final = "user-notifications:"


def session_channel(session_id: str) -> str:
    """Pub/sub channel carrying one session's events."""
    return f"{SESSION_CHANNEL_PREFIX}{session_id}"


def notification_channel(user_id: str) -> str:
    """Pub/sub channel carrying one user's notifications."""
    return f"{NOTIFICATION_CHANNEL_PREFIX}{user_id}"


def _session(session_id: str) -> str:
    # The hash tag is the channel name: the session's keys and channel hash to one slot.
    return f"{KEY_PREFIX}:{{{session_channel(session_id)}}}"


def _user(user_id: str) -> str:
    # Likewise for a user: the notification keys and the notification channel share a slot.
    return f"{KEY_PREFIX}:{{{notification_channel(user_id)}}}"


def session_state_key(session_id: str) -> str:
    # A hash, so one HGETALL gives the relay a consistent snapshot of the counters.
    return f"{_session(session_id)}:state"


def session_photos_key(session_id: str) -> str:
    # One field per distinct photo: this is what makes every command idempotent.
    return f"{_session(session_id)}:photos"


def session_failures_key(session_id: str) -> str:
    # Sorted by failure order so a snapshot can list the 100 most recent failures in O(log n).
    return f"{_session(session_id)}:failures"


def session_log_key(session_id: str) -> str:
    # A Stream: entry ids are the SSE event ids, so Last-Event-ID maps straight to XRANGE.
    return f"{_session(session_id)}:log"


def user_notifications_log_key(user_id: str) -> str:
    # Lets notification streams replay after a reconnection, like session streams.
    return f"{_user(user_id)}:notifications"


def session_completion_key(user_id: str, session_id: str) -> str:
    # In the user's slot (the notification is written there, in a step of its own, PROTOCOL §9):
    # holds "<SESSION_COMPLETED id> <notification id>" once the notification of that completion is
    # written, so a retried second step writes nothing. Keyed by the completion's id, not only the
    # session's: a session that expired and was started again notifies again when it completes.
    return f"{_user(user_id)}:completed:{session_id}"


def session_keys(session_id: str) -> tuple[str, str, str, str]:
    """State, photos, failures and log keys of one session, in the order the Lua scripts take them."""
    return (
        session_state_key(session_id),
        session_photos_key(session_id),
        session_failures_key(session_id),
        session_log_key(session_id),
    )


# --- fields inside those keys (the worker writes them, the relay reads them) ---------------------

#: Session state hash fields.
STATE_OWNER: Final = "owner"  # the user id that may stream the session (PROTOCOL §5 authorization)
STATE_TOTAL: Final = "total"
STATE_UPLOADED: Final = "uploaded"
STATE_FAILED: Final = "failed"
STATE_STATUS: Final = "status"  # IN_PROGRESS | COMPLETED
STATE_FAILURE_SEQ: Final = "fseq"  # counter giving failures their order in the failures set
#: Present from a completion until its notification is written (PROTOCOL §9): the completion's first
#: step (the session's slot) sets it, in the same script as SESSION_COMPLETED, so it is durable
#: wherever the session is; any later photo command of the session finishes the job if the worker
#: died before the second step. Value: ``<SESSION_COMPLETED id> <occurredAt> <total> <uploaded>
#: <failed>``, what the notification says (lua/session_state.lua writes and reads it).
STATE_PENDING_NOTIFICATION: Final = "notify"

#: Photos hash values: ``U`` for uploaded, ``F:<reason>`` for failed. In Lua only the contract's
#: ``lua/session_state.lua`` encodes or decodes them (PROTOCOL §10).
PHOTO_UPLOADED_MARK: Final = "U"
PHOTO_FAILED_PREFIX: Final = "F:"

#: Event log (Stream) entry fields: the event type, and the exact payload that was published
#: (with its own ``eventId``), so a replay writes the same bytes as the live stream did.
LOG_FIELD_TYPE: Final = "type"
LOG_FIELD_DATA: Final = "data"
