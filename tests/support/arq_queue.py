"""Read what is waiting in arq's queue straight from Redis (``arq:queue`` + ``arq:job:<id>``).

Tests check the wire format a pipeline in any language would write, so they read the raw keys and
parse the JSON themselves instead of going through arq.
"""

from __future__ import annotations

import json
from typing import Any, cast

import attrs
import redis
import redis.asyncio as aioredis

from rapidphoto_contract.jobs import QUEUE_NAME


@attrs.frozen
class QueuedJob:
    job_id: str
    score: float  # ms since the epoch at which the job may run
    data: dict[str, Any]  # the stored JSON: {"t", "f", "a", "k", "et"}

    @property
    def function(self) -> str:
        return cast(str, self.data["f"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.data["k"])


_Entries = list[tuple[bytes | str, float]]


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def queued_jobs(client: redis.Redis) -> list[QueuedJob]:
    """Every queued job in queue order (score, then id, as arq picks them)."""
    out = []
    entries = cast(_Entries, client.zrange(QUEUE_NAME, 0, -1, withscores=True))
    for member, score in entries:
        job_id = _decode(member)
        raw = client.get(f"arq:job:{job_id}")
        assert raw is not None, f"arq:job:{job_id} is missing"
        out.append(QueuedJob(job_id, float(score), json.loads(raw)))
    return out


async def aqueued_jobs(client: aioredis.Redis) -> list[QueuedJob]:
    out = []
    entries = cast(_Entries, await client.zrange(QUEUE_NAME, 0, -1, withscores=True))
    for member, score in entries:
        job_id = _decode(member)
        raw = await client.get(f"arq:job:{job_id}")
        assert raw is not None, f"arq:job:{job_id} is missing"
        out.append(QueuedJob(job_id, float(score), json.loads(raw)))
    return out
