"""The upload pipeline's interface (SPEC §3): job names, arguments, the JSON codec, the client.

Wire format of a queued job (arq's own layout, JSON instead of pickle)::

    {"t": 1, "f": "complete_photo_upload", "a": [],
     "k": {"session_id": "s1", "photo_id": "p1"}, "et": 1764213600000}

stored at ``arq:job:<job_id>``, with ``<job_id>`` added to the sorted set ``arq:queue`` (score: the
time in ms at which it may run). A pipeline written in another language enqueues by writing exactly
that; Python pipelines use :class:`UploadJobsClient`.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self

import attrs
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import Job
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import WatchError

from rapidphoto_contract.ids import validate_id, validate_session_id
from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options

START_UPLOAD_SESSION: Final = "start_upload_session"
COMPLETE_PHOTO_UPLOAD: Final = "complete_photo_upload"
FAIL_PHOTO_UPLOAD: Final = "fail_photo_upload"
JOB_NAMES: Final = (START_UPLOAD_SESSION, COMPLETE_PHOTO_UPLOAD, FAIL_PHOTO_UPLOAD)

#: arq's default queue, named by SPEC §3.
QUEUE_NAME: Final = "arq:queue"

MAX_TOTAL_PHOTOS: Final = 10_000
#: Tries of one enqueue whose transaction was interrupted (see UploadJobsClient._enqueue).
ENQUEUE_ATTEMPTS: Final = 3
#: A failure reason is shown to people; keep it a readable line, not a payload.
MAX_REASON_LENGTH: Final = 1024


class InvalidCommand(ValueError):
    """A job's arguments break SPEC §3's rules. Never retried; nothing changes."""


def _check_kwargs(job: str, kwargs: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    missing = [name for name in expected if name not in kwargs]
    unknown = sorted(set(kwargs) - set(expected))
    if missing:
        raise InvalidCommand(f"{job}: missing argument(s) {', '.join(missing)}")
    if unknown:
        raise InvalidCommand(f"{job}: unexpected argument(s) {', '.join(unknown)}")


def _valid(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise InvalidCommand(str(exc)) from None


@attrs.frozen(kw_only=True)
class StartUploadSession:
    session_id: str
    user_id: str
    total_photos: int

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(START_UPLOAD_SESSION, kwargs, ("session_id", "user_id", "total_photos"))
        total = kwargs["total_photos"]
        if not isinstance(total, int) or isinstance(total, bool):
            raise InvalidCommand(f"total_photos must be an integer, got {type(total).__name__}")
        if not 1 <= total <= MAX_TOTAL_PHOTOS:
            raise InvalidCommand(
                f"total_photos must be between 1 and {MAX_TOTAL_PHOTOS}, got {total}"
            )
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            user_id=_valid(validate_id, "user_id", kwargs["user_id"]),
            total_photos=total,
        )


@attrs.frozen(kw_only=True)
class CompletePhotoUpload:
    session_id: str
    photo_id: str

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(COMPLETE_PHOTO_UPLOAD, kwargs, ("session_id", "photo_id"))
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            photo_id=_valid(validate_id, "photo_id", kwargs["photo_id"]),
        )


@attrs.frozen(kw_only=True)
class FailPhotoUpload:
    session_id: str
    photo_id: str
    reason: str

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> Self:
        _check_kwargs(FAIL_PHOTO_UPLOAD, kwargs, ("session_id", "photo_id", "reason"))
        reason = kwargs["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidCommand("reason must be a non-empty string")
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidCommand(f"reason must be at most {MAX_REASON_LENGTH} characters")
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\ud800") survives the job codec but not the UTF-8 wire.
            raise InvalidCommand("reason must be valid Unicode text (no lone surrogates)") from None
        return cls(
            session_id=_valid(validate_session_id, kwargs["session_id"]),
            photo_id=_valid(validate_id, "photo_id", kwargs["photo_id"]),
            reason=reason,
        )


# --- the JSON job codec --------------------------------------------------------------------------

#: Key marking an exception in a serialized job result (arq stores the exception as the result).
EXCEPTION_KEY: Final = "__exception__"


class JobError(Exception):
    """A job's failure as read back from its JSON result: the worker's exception type and text."""

    def __init__(self, exc_type: str, message: str) -> None:
        self.exc_type = exc_type
        self.message = message
        super().__init__(f"{exc_type}: {message}")


def _default(obj: object) -> object:
    if isinstance(obj, BaseException):
        return {EXCEPTION_KEY: type(obj).__name__, "message": str(obj)}
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if attrs.has(type(obj)):
        return attrs.asdict(obj)  # type: ignore[arg-type]
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _revive(result: object) -> object:
    if isinstance(result, dict) and EXCEPTION_KEY in result:
        return JobError(str(result[EXCEPTION_KEY]), str(result.get("message", "")))
    return result


def serialize_job(data: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: UTF-8 JSON, never pickle (pickle from Redis would run code)."""
    return json.dumps(data, default=_default, separators=(",", ":")).encode()


def deserialize_job(raw: bytes) -> dict[str, Any]:
    """arq ``job_deserializer``: the inverse of :func:`serialize_job`; ``ValueError`` if not a job."""
    try:
        data = json.loads(raw)
    except RecursionError:
        # json.loads recurses per nesting level: 2 KB of "[[[…" raised RecursionError, not the
        # ValueError of any other bad input (found by the property tests, issue 9).
        raise ValueError("a job must be a JSON object, not nested this deep") from None
    if not isinstance(data, dict):
        raise ValueError("a job must be a JSON object")
    # Only a result ("r") can be an exception. Reviving any nested dict (as an object_hook would)
    # let a job's own kwargs turn into a JobError.
    if "r" in data:
        data["r"] = _revive(data["r"])
    return data


# --- the typed client ----------------------------------------------------------------------------


class UploadJobsClient:
    """Typed enqueue client for the upload pipeline.

    ``async with UploadJobsClient.connect(redis_url) as jobs: await jobs.complete_photo_upload(...)``.
    Arguments are validated before enqueueing, so a bad call raises :class:`InvalidCommand` here.
    """

    def __init__(self, pool: ArqRedis, *, owns_pool: bool = False) -> None:
        self._pool = pool
        self._owns_pool = owns_pool

    @classmethod
    def connect(cls, redis_url: str, *, max_connections: int = 50) -> _Connecting:
        """Connect to ``redis_url``; at most ``max_connections`` enqueues are in flight at once."""
        return _Connecting(redis_url, max_connections)

    @property
    def pool(self) -> ArqRedis:
        return self._pool

    async def close(self) -> None:
        if self._owns_pool:
            await self._pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _enqueue(self, name: str, kwargs: dict[str, Any], job_id: str | None) -> Job:
        # arq returns None both when a job with this id exists (or its result is kept) and when
        # its WATCH/MULTI transaction was interrupted: redis-py turns a connection lost while
        # watching (Redis restarted, CLIENT KILL) into a WatchError, which arq takes for "already
        # queued". Only the first means the job is queued; after the second, enqueue again. The
        # id is fixed here so that a second try cannot queue the job twice.
        job_id = job_id or uuid.uuid4().hex
        for _ in range(ENQUEUE_ATTEMPTS):
            try:
                job = await self._pool.enqueue_job(name, _job_id=job_id, **kwargs)
            except WatchError:
                job = None
            if job is not None:
                return job
            if await self._pool.exists(job_key_prefix + job_id, result_key_prefix + job_id):
                return Job(job_id, self._pool, _deserializer=deserialize_job)
        raise WatchError(f"{name}: enqueue interrupted {ENQUEUE_ATTEMPTS} times; not queued")

    async def start_upload_session(
        self, session_id: str, user_id: str, total_photos: int, *, job_id: str | None = None
    ) -> Job:
        cmd = StartUploadSession.parse(
            {"session_id": session_id, "user_id": user_id, "total_photos": total_photos}
        )
        return await self._enqueue(START_UPLOAD_SESSION, attrs.asdict(cmd), job_id)

    async def complete_photo_upload(
        self, session_id: str, photo_id: str, *, job_id: str | None = None
    ) -> Job:
        cmd = CompletePhotoUpload.parse({"session_id": session_id, "photo_id": photo_id})
        return await self._enqueue(COMPLETE_PHOTO_UPLOAD, attrs.asdict(cmd), job_id)

    async def fail_photo_upload(
        self, session_id: str, photo_id: str, reason: str, *, job_id: str | None = None
    ) -> Job:
        cmd = FailPhotoUpload.parse(
            {"session_id": session_id, "photo_id": photo_id, "reason": reason}
        )
        return await self._enqueue(FAIL_PHOTO_UPLOAD, attrs.asdict(cmd), job_id)


class _Connecting:
    """``UploadJobsClient.connect(url)``: awaitable, and an async context manager that closes."""

    def __init__(self, redis_url: str, max_connections: int = 50) -> None:
        self._url = redis_url
        self._max_connections = max_connections
        self._client: UploadJobsClient | None = None

    async def _open(self) -> UploadJobsClient:
        # Not arq's create_pool: it passes redis-py's deprecated ``retry_on_timeout`` (a
        # DeprecationWarning on every connect with redis-py >= 6, an error under
        # ``filterwarnings = error``) and retries a dead Redis for 5 s. redis-py parses the URL
        # itself (redis://, rediss://, unix://, ?db=), the same forms Settings accepts.
        pool = ArqRedis(
            # Blocking: a pipeline that enqueues with many concurrent tasks waits for a free
            # connection instead of failing with MaxConnectionsError past the pool size.
            # cancel_safe: an asyncio.timeout around an enqueue or a wait always takes effect.
            connection_pool=cancel_safe(
                BlockingConnectionPool.from_url(
                    self._url,
                    max_connections=self._max_connections,
                    timeout=30,
                    # An enqueue right after a Redis restart must not fail on a connection Redis
                    # closed; arq's enqueue is safe to send again (redis_options).
                    **pool_options(),
                )
            ),
            job_serializer=serialize_job,
            job_deserializer=deserialize_job,
            default_queue_name=QUEUE_NAME,
        )
        pool.auto_close_connection_pool = True  # closing the client closes its own pool
        try:
            await pool.ping()
        except BaseException:
            await pool.aclose()
            raise
        return UploadJobsClient(pool, owns_pool=True)

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> UploadJobsClient:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()
