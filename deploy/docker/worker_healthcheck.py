"""Docker HEALTHCHECK of the worker image: arq's own check (``arq --check``), against ``REDIS_URL``.

``arq --check rapidphoto_worker.main.WorkerSettings`` would read the Redis address from
``WorkerSettings.redis_settings``, which the worker deliberately leaves unset (it builds it from
``REDIS_URL`` at start-up, CONVENTIONS §4), so it would look at localhost. This runs the same function,
:func:`arq.worker.async_check_health`, with the connection from ``REDIS_URL``.

What it proves: a worker on ``arq:queue`` wrote arq's health record (``arq:queue:health-check``)
within the last ``health_check_interval`` + 1 s. The record is per queue, not per process, so with
several workers it means "the queue is being worked", not "this container works" (see
docs/operations.md). Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from arq.connections import RedisSettings
from arq.worker import async_check_health
from redis.exceptions import RedisError

from rapidphoto_contract.jobs import QUEUE_NAME
from rapidphoto_contract.settings import ConfigError, WorkerConfig


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="worker health check: %(message)s")
    try:
        url = WorkerConfig.from_env().queue_redis_url  # arq's health record
        redis = RedisSettings.from_dsn(url)
    except (ConfigError, ValueError) as exc:
        print(f"worker health check: {exc}", file=sys.stderr)
        return 1
    # One quick attempt: Docker's own retries decide when the container is unhealthy.
    redis = dataclasses.replace(redis, conn_timeout=2, conn_retries=0)
    try:
        code: int = asyncio.run(async_check_health(redis, queue_name=QUEUE_NAME))
    except (RedisError, OSError) as exc:
        print(f"worker health check: cannot reach Redis: {type(exc).__name__}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
