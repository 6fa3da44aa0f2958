"""Connection limits of PROTOCOL §2/§5: per process (503) and per user ``sub`` (429).

Every open stream counts, from the moment it is admitted (before its first byte) until its writer
has finished. ``Retry-After`` is a whole number of seconds, at least 1 (RFC 9110 §10.2.3); a full
process adds a little jitter so refused clients do not all come back in the same second.
"""

from __future__ import annotations

import math
import random
from typing import Literal

Limit = Literal["process", "user"]


class LimitExceeded(Exception):
    def __init__(self, limit: Limit, retry_after: int) -> None:
        self.limit: Limit = limit
        self.retry_after = retry_after
        super().__init__(
            "too many open streams on this relay"
            if limit == "process"
            else "too many open streams for this user"
        )

    @property
    def status_code(self) -> int:
        return 503 if self.limit == "process" else 429


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_user: int, retry_ms: int) -> None:
        self.max_total = max_total
        self.max_per_user = max_per_user
        #: ``Retry-After`` for a stream refused for any reason but a full process: the SSE
        #: ``retry`` delay in whole seconds, at least 1.
        self.retry_after = max(1, math.ceil(retry_ms / 1000))
        self._per_user: dict[str, int] = {}
        self.total = 0

    def acquire(self, user_id: str) -> None:
        """Count one more stream for ``user_id`` or raise :class:`LimitExceeded`."""
        if self.total >= self.max_total:
            raise LimitExceeded("process", self.retry_after + random.randint(0, 2))
        held = self._per_user.get(user_id, 0)
        if held >= self.max_per_user:
            raise LimitExceeded("user", self.retry_after)
        self._per_user[user_id] = held + 1
        self.total += 1

    def release(self, user_id: str) -> None:
        held = self._per_user.get(user_id, 0)
        if held <= 1:
            self._per_user.pop(user_id, None)
        else:
            self._per_user[user_id] = held - 1
        self.total = max(0, self.total - 1)

    def held_by(self, user_id: str) -> int:
        return self._per_user.get(user_id, 0)
