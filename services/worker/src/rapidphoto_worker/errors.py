"""The worker's named errors (CONVENTIONS §8): why a job failed, as a type a caller can match on.

Each is final for its job: arq records it as the job's result and does not retry it. Transient Redis
failures are not here; they become ``arq.Retry`` (see :mod:`rapidphoto_worker.commands`). Bad job
arguments raise the contract's :class:`~rapidphoto_contract.jobs.InvalidCommand`, re-exported here so
every failure a job can end with is importable from one module.
"""

from __future__ import annotations

from rapidphoto_contract.jobs import InvalidCommand

__all__ = [
    "CommandError",
    "InvalidCommand",
    "SessionConflict",
    "SessionNotFound",
    "TooManyPhotos",
]


class CommandError(Exception):
    """A well-formed command that the session's state refuses. Nothing changed."""


class SessionConflict(CommandError):
    """``start_upload_session`` for a session that exists with another owner or total (PROTOCOL §3)."""


class TooManyPhotos(CommandError):
    """A new distinct photo for a session that already has ``total_photos`` of them (PROTOCOL §3)."""


class SessionNotFound(CommandError):
    """A photo job whose session was still not started after the retry window (PROTOCOL §3)."""
