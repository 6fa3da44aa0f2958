"""The typed enqueue client of the upload pipeline (PROTOCOL §3): arq's queue, the contract's codec.

``async with UploadJobsClient.connect(redis_url) as jobs: await jobs.complete_photo_upload(...)``.
The job names, argument rules and JSON layout are the contract's (:mod:`rapidphoto_contract.jobs`);
this module is the network side, and the reason the tools, not the contract, depend on arq.
"""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Any, Final, Self

import attrs
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import Job
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import WatchError

from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    CompletePhotoUpload,
    FailPhotoUpload,
    StartUploadSession,
    deserialize_job,
    serialize_job,
)
from rapidphoto_contract.redis_cancel import cancel_safe
from rapidphoto_contract.redis_options import pool_options

#: Tries of one enqueue whose transaction was interrupted (see UploadJobsClient._enqueue).
ENQUEUE_ATTEMPTS: Final = 3


class UploadJobsClient:
    """Typed enqueue client for the upload pipeline.

    ``async with UploadJobsClient.connect(redis_url) as jobs: await jobs.complete_photo_upload(...)``.
    Arguments are validated before enqueueing, so a bad call raises
    :class:`~rapidphoto_contract.jobs.InvalidCommand` here.
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
