"""How every Redis client of the product treats a connection Redis has closed: one policy, one place.

A Redis restart, a failover or ``CLIENT KILL`` closes every connection while it sits idle in a pool.
With redis-py 8.1 as we build our pools, the next command on each of them failed with "Connection
closed by server" (a relay answered 503, an enqueue raised, the worker's arq loop stopped), because:

- under RESP3, redis-py's default protocol, a TCP pool enables maintenance notifications ("auto"),
  and with them on, check-out skips its test for a connection the server closed (redis/redis-py#4252,
  a regression of 8.1.0, fixed upstream after it);
- a pool built by hand (``ConnectionPool.from_url``, ours) gets ``Retry(NoBackoff(), 0)``: the
  retries of ``Redis()``'s defaults apply only to a pool ``Redis`` builds itself.

So every pool of the product gets :func:`pool_options`:

- **maintenance notifications off**: a Redis Enterprise/Cloud feature we do not use (open-source Redis
  rejects its handshake, a wasted round trip per new connection). With it off, check-out replaces a
  connection whose close has reached us *before anything is sent on it* (the usual case: Redis
  closed it while it sat idle): safe for any command, writes included.
- **a short retry on** ``ConnectionError`` (which includes ``LOADING`` while a restarted Redis reads
  its data), for a connection lost between check-out and the reply, and for the reconnection itself.
  redis-py reconnects and sends the command again, so a client takes it only when every command it
  sends may run twice: the relay's reads; the worker's scripts (idempotent by design,
  rapidphoto_worker.commands) and arq's bookkeeping (after a lost reply, a job's try counter may
  count one start too many, or a claimed job wait for its 20 s lock: what a worker crash does);
  arq's enqueue (it sends WATCH first, and redis-py never re-sends under WATCH: a connection lost
  after it is a ``WatchError``, which UploadJobsClient answers by enqueueing again under the same
  job id). Not on ``TimeoutError``: a Redis that does not answer would cost a whole socket timeout
  per try. Bounded: with Redis really down every try is refused at once, and the backoffs add up to
  at most :data:`MAX_RETRY_SECONDS`, so a relay still answers 503 (with ``Retry-After``) quickly.
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig

#: Tries after the first. Backoff before try n: uniform in [0, BASE * 2**n], at most CAP.
RETRIES: Final = 3
BACKOFF_BASE_SECONDS: Final = 0.05
BACKOFF_CAP_SECONDS: Final = 0.5
#: The most the backoffs of one call add up to (0.1 + 0.2 + 0.4 s).
MAX_RETRY_SECONDS: Final = sum(
    min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**n) for n in range(1, RETRIES + 1)
)


def retry_policy(retries: int = RETRIES) -> Retry:
    """A new ``Retry`` (it is mutable): ``retries`` more tries on ``ConnectionError``, jittered."""
    return Retry(
        ExponentialWithJitterBackoff(base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS),
        retries,
        supported_errors=(RedisConnectionError,),
    )


def pool_options(retries: int = RETRIES) -> dict[str, Any]:
    """Keyword arguments for ``ConnectionPool.from_url`` / ``Redis.from_url`` (see the module)."""
    return {
        "retry": retry_policy(retries),
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
