"""PROTOCOL §5 connection limits over real HTTP: per process 503, per user 429, both with Retry-After."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from rapidphoto_relay.limits import ConnectionLimits, LimitExceeded
from tests.relay.conftest import RelayFactory, eventually
from tests.support.seed import Seeder
from tests.support.sse import SSEStream, open_sse

NOTIFICATIONS = "/api/upload/sessions/notifications/stream"


def _retry_after(stream: SSEStream) -> int:
    value = stream.headers["retry-after"]
    assert value.isdigit(), value
    assert int(value) >= 1
    return int(value)


async def test_per_user_and_per_process_limits(
    relay_factory: RelayFactory, seed: Seeder, ids: Callable[[str], str]
) -> None:
    relay = relay_factory(
        RELAY_MAX_CONNECTIONS="3", RELAY_MAX_CONNECTIONS_PER_USER="2", SSE_RETRY_MS="3500"
    )
    pending_session = ids("s")  # a stream waiting for its session counts too
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("alice"))
        )
        second = await stack.enter_async_context(
            open_sse(
                relay.base_url,
                f"/api/upload/sessions/{pending_session}/stream",
                token=relay.token("alice"),
            )
        )
        assert (first.status_code, second.status_code) == (200, 200)
        assert (await first.next_frame()).raw == b"retry: 3500\n\n"  # SSE_RETRY_MS
        async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("alice")) as third:
            assert third.status_code == 429
            assert _retry_after(third) >= 4  # never sooner than the SSE retry delay
            assert set(third.error()) == {"error"}
        bob = await stack.enter_async_context(
            open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("bob"))
        )
        assert bob.status_code == 200
        async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("carol")) as full:
            assert full.status_code == 503
            _retry_after(full)
            assert set(full.error()) == {"error"}
        assert relay.metric("rapidphoto_relay_rejected_streams_total", 'limit="user"') == 1
        assert relay.metric("rapidphoto_relay_rejected_streams_total", 'limit="process"') == 1
    # closing streams frees their places
    await eventually(
        lambda: (
            relay.metric("rapidphoto_relay_open_streams", 'kind="notifications"') == 0
            and relay.metric("rapidphoto_relay_open_streams", 'kind="session"') == 0
        ),
        within=5,
        what="streams released",
    )
    async with open_sse(relay.base_url, NOTIFICATIONS, token=relay.token("carol")) as again:
        assert again.status_code == 200


# --- the counting itself, in-process ---


def test_limits_count_per_user_and_in_total() -> None:
    limits = ConnectionLimits(max_total=3, max_per_user=2, retry_ms=2000)
    limits.acquire("a")
    limits.acquire("a")
    with pytest.raises(LimitExceeded) as per_user:
        limits.acquire("a")
    assert (per_user.value.status_code, per_user.value.retry_after) == (429, 2)
    limits.acquire("b")
    with pytest.raises(LimitExceeded) as total:
        limits.acquire("c")
    assert total.value.status_code == 503
    assert 2 <= total.value.retry_after <= 4
    limits.release("a")
    limits.acquire("c")
    assert (limits.total, limits.held_by("a"), limits.held_by("c")) == (3, 1, 1)


def test_retry_after_is_at_least_one_second() -> None:
    limits = ConnectionLimits(max_total=2, max_per_user=1, retry_ms=0)
    limits.acquire("a")
    with pytest.raises(LimitExceeded) as per_user:
        limits.acquire("a")
    assert per_user.value.retry_after == 1
    limits.acquire("b")
    with pytest.raises(LimitExceeded) as total:
        limits.acquire("c")
    assert 1 <= total.value.retry_after <= 3
