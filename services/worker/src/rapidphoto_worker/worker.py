"""arq's ``Worker``, taking queued jobs in batches.

Why: arq 0.28 starts each job with four sequential round trips (WATCH, EXISTS, ZSCORE, then
MULTI/PSETEX/EXEC) in its single polling loop, one job after another. However many jobs may run at
once, that loop alone held one process to about 500 jobs/s (``loadtests/bench_worker.py``), well
under the 1,000 commands/s we want from one process.

:class:`BatchClaimWorker` replaces only that step, ``start_jobs``: one Lua script
(``lua/claim_jobs.lua``) makes arq's checks and sets arq's in-progress keys for as many jobs as there
are free slots, in one round trip. When every slot is busy it waits for a job to finish instead of
returning to the poll loop, which would sleep ``poll_delay`` with work queued. Everything else is
arq's own: running jobs, timeouts, ``Retry``, ``max_tries``, results, shutdown. It shares a queue
safely with stock arq workers (``arq rapidphoto_worker.main.WorkerSettings`` runs one): both hold a
job by creating ``arq:in-progress:<id>``.

This leans on ``Worker`` internals (``sem``, ``job_counter``, ``tasks``, ``run_job``); the worker tests
run it against the installed arq, so an arq release that changes them fails there first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from importlib import resources
from typing import Final

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript
from redis.exceptions import OutOfMemoryError

from rapidphoto_contract.logs import Throttle

CLAIM_SCRIPT: Final = (resources.files(__package__) / "lua" / "claim_jobs.lua").read_text(
    encoding="utf-8"
)
#: While Redis refuses writes (out of memory), the poll loop waits this long between attempts.
OUT_OF_MEMORY_BACKOFF_SECONDS: Final = 0.5
#: At most one "out of memory" log line per this many seconds.
OUT_OF_MEMORY_LOG_INTERVAL: Final = 5.0

log = logging.getLogger("rapidphoto.worker")


class BatchClaimWorker(Worker):
    """An arq ``Worker`` whose ``start_jobs`` claims jobs in batches (see the module docstring)."""

    _claim: AsyncScript | None = None
    _oom_log: Throttle | None = None

    async def _poll_iteration(self) -> None:
        """arq's poll step, surviving a Redis that is out of memory.

        With ``maxmemory`` reached and ``noeviction``, Redis refuses every write: the claim script,
        arq's health record, a job's result. arq lets that error end its loop, and with it the
        process. It passes once memory is freed, so wait and poll again instead. Nothing is lost:
        unclaimed jobs stay queued, and a job whose result could not be written keeps its
        in-progress mark and runs again, as a duplicate, once the mark expires.
        """
        try:
            await super()._poll_iteration()
        except OutOfMemoryError as exc:
            if self._oom_log is None:
                self._oom_log = Throttle(OUT_OF_MEMORY_LOG_INTERVAL)
            if self._oom_log.hit() is not None:
                log.warning("Redis is out of memory, waiting: %s", exc)
            await asyncio.sleep(OUT_OF_MEMORY_BACKOFF_SECONDS)

    async def _claim_jobs(self, job_ids: list[str]) -> list[tuple[str, int]]:
        if self._claim is None:
            self._claim = self.pool.register_script(CLAIM_SCRIPT)
        reply = await self._claim(
            keys=[self.queue_name, *(in_progress_key_prefix + job_id for job_id in job_ids)],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), *job_ids],
        )
        return [(reply[i].decode(), int(float(reply[i + 1]))) for i in range(0, len(reply), 2)]

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        pending = deque(job_id.decode() for job_id in job_ids)
        while pending and self.allow_pick_jobs:
            free = self.max_jobs - self.job_counter
            if free <= 0:
                # Every slot busy: wait for one rather than return to the poll loop, which would
                # sleep poll_delay with jobs waiting.
                running = [task for task in self.tasks.values() if not task.done()]
                if not running:  # slots are freed by done-callbacks; let the poll loop go on
                    return
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            batch = [pending.popleft() for _ in range(min(free, len(pending)))]
            for job_id, score in await self._claim_jobs(batch):
                # arq's slot accounting, as in Worker.start_jobs; neither blocks: a slot is free.
                await self.sem.acquire()
                self.job_counter += 1
                task = self.loop.create_task(self.run_job(job_id, score))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task
