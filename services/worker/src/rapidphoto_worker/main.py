"""The arq worker: its settings, start-up and shutdown, the job functions, the console script.

``rapidphoto-worker`` is ``arq rapidphoto_worker.main.WorkerSettings`` with the Redis connection taken
from ``REDIS_URL`` (PROTOCOL §2). The job functions are thin: parse the arguments with the contract (bad
ones raise ``InvalidCommand``: the job fails, is not retried and changes nothing), run the command,
log one line, return a small JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

from arq import Retry, func
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Function, get_kwargs
from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.backoff import EqualJitterBackoff

from rapidphoto_contract.ids import is_valid_id
from rapidphoto_contract.jobs import (
    COMPLETE_PHOTO_UPLOAD,
    FAIL_PHOTO_UPLOAD,
    QUEUE_NAME,
    START_UPLOAD_SESSION,
    CompletePhotoUpload,
    FailPhotoUpload,
    InvalidCommand,
    StartUploadSession,
    deserialize_job,
    serialize_job,
)
from rapidphoto_contract.logs import FIELDS
from rapidphoto_contract.redis_options import pool_options, retry_policy
from rapidphoto_contract.settings import ConfigError, WorkerConfig
from rapidphoto_worker import commands
from rapidphoto_worker.commands import CommandResult
from rapidphoto_worker.context import CTX_KEY, WorkerContext, from_ctx
from rapidphoto_worker.errors import CommandError
from rapidphoto_worker.logs import configure_logging
from rapidphoto_worker.worker import BatchClaimWorker

log = logging.getLogger("rapidphoto.worker")

#: A job takes milliseconds; this only bounds a stuck one. It also decides how soon a job held by a
#: worker that died (SIGKILL, OOM) runs again: arq's in-progress mark lives job_timeout + 10 s.
#: A Redis call gives up first (context.SOCKET_TIMEOUT_SECONDS), so a slow Redis means a retry.
JOB_TIMEOUT_SECONDS: Final = 10
#: Jobs one process runs at a time. Each is a couple of Redis round trips, so concurrency is what
#: keeps the process busy; more than this only lengthens arq's queue scans. See loadtests/bench_worker.py.
MAX_JOBS: Final = 50
#: How long an idle worker waits before looking at the queue again: the latency a job sees when the
#: worker is idle. One ZRANGEBYSCORE per poll.
POLL_DELAY_SECONDS: Final = 0.05
#: PROTOCOL §3: "Job results are kept as arq keeps them (one hour by default)".
KEEP_RESULT_SECONDS: Final = 3600
#: On SIGTERM stop taking jobs and let running ones finish for this long before cancelling them (a
#: cancelled job is run again; its script either ran whole or not at all).
SHUTDOWN_GRACE_SECONDS: Final = 5

#: arq rewrites its health record (arq:queue:health-check, read by the image's HEALTHCHECK) this often;
#: the record lives interval + 1 s. arq's default, an hour, would let a stopped queue look healthy
#: for an hour; this is below the image's 30 s check interval (docs/operations.md).
HEALTH_CHECK_INTERVAL_SECONDS: Final = 10

#: After losing Redis, main() restarts the arq worker with exponential backoff up to this cap…
RESTART_BACKOFF_CAP_SECONDS: Final = 10.0
RESTART_BACKOFF: Final = EqualJitterBackoff(cap=RESTART_BACKOFF_CAP_SECONDS, base=0.5)
#: …and starts the backoff over when the previous run lasted at least this long.
RESTART_RESET_SECONDS: Final = 60.0

#: Set by startup and left there by shutdown: main() tells "Redis went away under a running
#: worker" (restart it) from "Redis was never reachable" (a wrong REDIS_URL: exit).
STARTED_CTX_KEY: Final = "rapidphoto_started"

#: main() hands the WorkerConfig it validated to on_startup through arq's ctx under this key.
SETTINGS_CTX_KEY: Final = "rapidphoto_settings"


# --- lifecycle -----------------------------------------------------------------------------------


async def _check_queue_redis(pool: ArqRedis, settings: WorkerConfig) -> None:
    """The queue rule, for both modes (PROTOCOL §2, §9): arq takes jobs from the server and database
    ``QUEUE_REDIS_URL`` names (``REDIS_URL`` unless set), and that is a standalone Redis.

    Under ``arq <module>.WorkerSettings`` arq's pool does not come from our variables: a worker
    polling another queue than the pipeline fills would never run a job. And arq runs WATCH/MULTI
    over keys of many slots, which a cluster node refuses (arq has no cluster support).
    """
    queue = aioredis.Redis.from_url(settings.queue_redis_url, **pool_options())
    try:
        named_info = await queue.info("server")
        named_db = queue.connection_pool.connection_kwargs.get("db", 0)
    finally:
        await queue.aclose()
    arq_info, arq_cluster = await pool.info("server"), await pool.info("cluster")
    arq_db = pool.connection_pool.connection_kwargs.get("db", 0)
    variable = "QUEUE_REDIS_URL" if settings.queue_redis_url != settings.redis_url else "REDIS_URL"
    if (arq_info.get("run_id"), int(arq_db)) != (named_info.get("run_id"), int(named_db)):
        raise ConfigError(
            variable,
            f"arq takes jobs from another Redis server or database than {variable} names; "
            "start the worker with rapidphoto-worker, which uses it for the queue",
        )
    if int(arq_cluster.get("cluster_enabled", 0)):
        raise ConfigError(
            variable,
            "the arq queue is on a Redis Cluster node; arq needs a standalone Redis "
            "(with REDIS_CLUSTER=1, set QUEUE_REDIS_URL to one)",
        )


async def startup(ctx: dict[str, Any]) -> None:
    """arq ``on_startup``: build the settings (unless main() did), the Redis client, the scripts."""
    settings = ctx.get(SETTINGS_CTX_KEY)
    if not isinstance(settings, WorkerConfig):
        settings = WorkerConfig.from_env()
    app = await WorkerContext.create(settings)
    try:
        await _check_queue_redis(ctx["redis"], settings)
    except BaseException:
        await app.aclose()
        raise
    ctx[CTX_KEY] = app
    ctx[STARTED_CTX_KEY] = True
    log.info(
        "worker ready",
        extra={
            FIELDS: {
                "queue": QUEUE_NAME,
                "redis_cluster": settings.redis_cluster,
                "wait_replicas": settings.redis_wait_replicas,
                "session_ttl_seconds": settings.session_ttl_seconds,
                "session_log_maxlen": settings.session_log_maxlen,
                "max_jobs": MAX_JOBS,
            }
        },
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown``: close what startup opened."""
    app = ctx.pop(CTX_KEY, None)
    if isinstance(app, WorkerContext):
        await app.aclose()
    log.info("worker stopped")


# --- the jobs ------------------------------------------------------------------------------------

Handler = Callable[[WorkerContext, int], Awaitable[CommandResult]]


def _id_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # Only ids that are valid go to the log: anything else may be huge or hostile.
    return {
        name: kwargs[name]
        for name in ("session_id", "photo_id", "user_id")
        if is_valid_id(kwargs.get(name))
    }


async def _run(
    ctx: Mapping[str, Any], job: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], run: Handler
) -> dict[str, Any]:
    """Run one job and log its one outcome line: applied, duplicate, retry or failed."""
    started = time.perf_counter()
    job_try = int(ctx.get("job_try", 1))
    fields: dict[str, Any] = {"job": job, "job_id": ctx.get("job_id"), "try": job_try}
    fields.update(_id_fields(kwargs))

    def done(level: int, outcome: str, **more: Any) -> None:
        fields.update(outcome=outcome, ms=round((time.perf_counter() - started) * 1000, 2), **more)
        log.log(level, "job %s", outcome, extra={FIELDS: fields})

    try:
        if args:  # PROTOCOL §3: jobs are called with keyword arguments
            raise InvalidCommand(f"{job}: takes keyword arguments only, got {len(args)} positional")
        result = await run(from_ctx(ctx), job_try)
    except Retry as exc:
        cause = exc.__cause__
        done(
            logging.INFO,
            "retry",
            defer_ms=exc.defer_score,
            reason=type(cause).__name__ if cause else "session-not-started",
        )
        raise
    except (InvalidCommand, CommandError) as exc:
        done(logging.WARNING, "failed", error=type(exc).__name__, detail=str(exc))
        raise
    except Exception as exc:
        fields.update(error=type(exc).__name__)
        done(logging.ERROR, "failed")
        log.exception("job %s raised", job, extra={FIELDS: {"job_id": ctx.get("job_id")}})
        raise
    done(logging.INFO, result.outcome, event_ids=list(result.event_ids))
    return result.to_dict()


async def start_upload_session(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    async def run(app: WorkerContext, job_try: int) -> CommandResult:
        return await commands.start_upload_session(app, StartUploadSession.parse(kwargs), job_try)

    return await _run(ctx, START_UPLOAD_SESSION, args, kwargs, run)


async def complete_photo_upload(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    async def run(app: WorkerContext, job_try: int) -> CommandResult:
        return await commands.complete_photo_upload(app, CompletePhotoUpload.parse(kwargs), job_try)

    return await _run(ctx, COMPLETE_PHOTO_UPLOAD, args, kwargs, run)


async def fail_photo_upload(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    async def run(app: WorkerContext, job_try: int) -> CommandResult:
        return await commands.fail_photo_upload(app, FailPhotoUpload.parse(kwargs), job_try)

    return await _run(ctx, FAIL_PHOTO_UPLOAD, args, kwargs, run)


class WorkerSettings:
    """arq's worker settings (``arq rapidphoto_worker.main.WorkerSettings`` reads these)."""

    functions: ClassVar[list[Function]] = [
        func(start_upload_session, name=START_UPLOAD_SESSION),
        func(complete_photo_upload, name=COMPLETE_PHOTO_UPLOAD),
        func(fail_photo_upload, name=FAIL_PHOTO_UPLOAD),
    ]
    queue_name = QUEUE_NAME
    # PROTOCOL §3: JSON both ways, never pickle (unpickling data from Redis would run its code).
    job_serializer = serialize_job
    job_deserializer = deserialize_job
    on_startup = startup
    on_shutdown = shutdown
    job_timeout = JOB_TIMEOUT_SECONDS
    max_tries = commands.MAX_TRIES
    max_jobs = MAX_JOBS
    poll_delay = POLL_DELAY_SECONDS
    keep_result = KEEP_RESULT_SECONDS
    job_completion_wait = SHUTDOWN_GRACE_SECONDS
    health_check_interval = HEALTH_CHECK_INTERVAL_SECONDS


def create_worker(**overrides: Any) -> BatchClaimWorker:
    """The worker ``rapidphoto-worker`` runs: :class:`WorkerSettings`, with ``overrides``."""
    return BatchClaimWorker(**{**get_kwargs(WorkerSettings), **overrides})  # type: ignore[arg-type]


# --- the console script --------------------------------------------------------------------------


def redis_settings(settings: WorkerConfig) -> RedisSettings:
    """arq's connection settings for ``QUEUE_REDIS_URL`` (``REDIS_URL`` unless set)."""
    try:
        parsed = RedisSettings.from_dsn(settings.queue_redis_url)
    except (ValueError, RuntimeError) as exc:
        # Not the URL itself: it may hold a password.
        variable = (
            "QUEUE_REDIS_URL" if settings.queue_redis_url != settings.redis_url else "REDIS_URL"
        )
        raise ConfigError(variable, f"not a valid Redis URL ({exc})") from None
    # arq builds its pool with no retry: the first poll after a Redis restart or CLIENT KILL hit a
    # connection Redis had closed, and the whole worker stopped (jobs it held waited 20 s for
    # their lock to expire). arq's commands may be sent again (redis_options).
    return dataclasses.replace(parsed, retry=retry_policy())


def main(argv: Sequence[str] | None = None) -> None:
    """``rapidphoto-worker``: run the worker until SIGTERM/SIGINT (or, with --burst, an empty queue)."""
    parser = argparse.ArgumentParser(
        prog="rapidphoto-worker",
        description="Run the RapidPhoto upload-session worker (an arq worker). "
        "Configured by environment variables: REDIS_URL, REDIS_CLUSTER, QUEUE_REDIS_URL, "
        "REDIS_WAIT_REPLICAS, REDIS_WAIT_TIMEOUT_MS, SESSION_TTL_SECONDS, SESSION_LOG_MAXLEN.",
    )
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    options = parser.parse_args(argv)
    configure_logging()
    try:
        settings = WorkerConfig.from_env()
        arq_redis = redis_settings(settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc, extra={FIELDS: {"variable": exc.variable}})
        raise SystemExit(2) from None
    ever_started = False
    attempt = 0
    while True:
        # arq's Worker takes the current event loop; give it a fresh one rather than rely on
        # asyncio.get_event_loop() creating one, which newer Pythons no longer do.
        asyncio.set_event_loop(asyncio.new_event_loop())
        ctx: dict[str, Any] = {SETTINGS_CTX_KEY: settings}
        began = time.monotonic()
        try:
            create_worker(redis_settings=arq_redis, ctx=ctx, burst=options.burst).run()
            return
        except ConfigError as exc:
            log.error("configuration error: %s", exc, extra={FIELDS: {"variable": exc.variable}})
            raise SystemExit(2) from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            ever_started = ever_started or bool(ctx.get(STARTED_CTX_KEY))
            where = {"host": arq_redis.host, "port": arq_redis.port}
            if options.burst or not ever_started:
                # Never got going: a wrong REDIS_URL should fail loudly, not loop.
                log.error("cannot reach Redis: %s", exc, extra={FIELDS: where})
                raise SystemExit(1) from None
            # Redis went away under a running worker (restart, fail-over): arq's loop ends with
            # the connection. Start again rather than exit, so one Redis restart does not take
            # every worker down with it; jobs it held run again (the scripts make that safe).
            attempt = 1 if time.monotonic() - began > RESTART_RESET_SECONDS else attempt + 1
            # jittered: workers must not reconnect in lockstep
            delay = RESTART_BACKOFF.compute(min(attempt - 1, 16))
            log.warning(
                "lost Redis, restarting the worker in %.1f s: %s",
                delay,
                exc,
                extra={FIELDS: {**where, "attempt": attempt}},
            )
            time.sleep(delay)


if __name__ == "__main__":
    main()
