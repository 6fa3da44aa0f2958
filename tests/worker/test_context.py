"""rapidphoto_worker.context: the per-process context and its owner memory."""

from __future__ import annotations

import pytest

from rapidphoto_worker.context import CTX_KEY, OwnerCache, WorkerContext, from_ctx


def test_owner_cache_keeps_the_most_recently_used_sessions() -> None:
    cache = OwnerCache(maxsize=2)
    cache.put("s1", "u1")
    cache.put("s2", "u2")
    assert cache.get("s1") == "u1"  # s1 is now the most recent
    cache.put("s3", "u3")  # evicts s2, the least recently used

    assert (cache.get("s1"), cache.get("s2"), cache.get("s3")) == ("u1", None, "u3")
    assert len(cache) == 2
    cache.forget("s1")
    assert cache.get("s1") is None
    cache.forget("unknown")  # forgetting what is not there is fine


async def test_the_context_is_found_in_arq_ctx(app: WorkerContext) -> None:
    assert from_ctx({CTX_KEY: app}) is app
    with pytest.raises(RuntimeError, match="on_startup"):
        from_ctx({})
