"""rapidphoto_worker.context: the per-process context."""

from __future__ import annotations

import pytest

from rapidphoto_worker.context import CTX_KEY, WorkerContext, from_ctx


async def test_the_context_is_found_in_arq_ctx(app: WorkerContext) -> None:
    assert from_ctx({CTX_KEY: app}) is app
    with pytest.raises(RuntimeError, match="on_startup"):
        from_ctx({})


async def test_a_standalone_redis_publishes_with_publish(app: WorkerContext) -> None:
    assert not app.state.cluster
    assert app.state.publish == "PUBLISH"
