"""The stream routes' direct path (fast_path.py): which requests it takes, and that it answers
exactly as the Litestar route does. A request with an ``Origin`` header goes through Litestar (the
shared relay has no CORS origins, so Litestar ignores the header): each request is sent both ways
and the answers compared."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from rapidphoto_relay.fast_path import stream_route
from tests.relay.conftest import Relay
from tests.support.seed import Seeder
from tests.support.sse import SSEStream, open_sse

Ids = Callable[[str], str]
NOTIFICATIONS = "/api/upload/sessions/notifications/stream"
LITESTAR = {"Origin": "http://elsewhere.example"}


def scope(path: str, method: str = "GET", **headers: str) -> Any:
    encoded = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "path": path, "headers": encoded}


@pytest.mark.parametrize(
    ("request_scope", "route"),
    [
        (scope(NOTIFICATIONS), "notifications"),
        (scope("/api/upload/sessions/s-1_A/stream"), "s-1_A"),
        (scope("/api/upload/sessions/a/b/stream"), None),  # not an id: Litestar's 404
        (scope("/api/upload/sessions/bad!id/stream"), None),  # not an id: Litestar's 400
        (scope("/api/upload/sessions/stream"), None),  # the multi-session stream
        (scope(NOTIFICATIONS + "/"), None),
        (scope(NOTIFICATIONS, method="HEAD"), None),
        (scope(NOTIFICATIONS, Origin="http://x"), None),  # the CORS middleware must see it
        (scope("/api/upload/sessions/s1/stream", Origin="http://x"), None),
        (scope("/health/ready"), None),
        ({"type": "lifespan"}, None),
    ],
)
def test_which_requests_take_the_direct_path(request_scope: Any, route: str | None) -> None:
    assert stream_route(request_scope) == route


async def answer(relay: Relay, path: str, via_litestar: bool, **kwargs: Any) -> tuple[Any, ...]:
    """Status, content type, ``WWW-Authenticate``/``Retry-After`` and body or first frames."""
    headers = {**kwargs.pop("headers", {}), **(LITESTAR if via_litestar else {})}
    live = kwargs.pop("live", False)
    async with open_sse(relay.base_url, path, headers=headers, **kwargs) as stream:
        return (
            stream.status_code,
            stream.headers.get("content-type"),
            stream.headers.get("www-authenticate"),
            stream.headers.get("retry-after"),
            await _content(stream, live),
        )


async def _content(stream: SSEStream, live: bool) -> Any:
    """The body of a refusal; the ``retry:`` frame and first event of a stream (``live``: a
    stream that has no event to start with, its ``retry:`` frame only)."""
    if stream.status_code != 200:
        return stream.body
    first = await stream.next_frame()
    if live:
        return first.retry
    event = await stream.next_event()
    return first.retry, event.event, event.id, event.json()


async def both_ways_alike(relay: Relay, path: str, **kwargs: Any) -> tuple[Any, ...]:
    direct = await answer(relay, path, False, **dict(kwargs))
    framework = await answer(relay, path, True, **dict(kwargs))
    assert direct == framework
    return direct


async def test_refusals_are_the_same_both_ways(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "owner", 2)
    assert (await both_ways_alike(relay, NOTIFICATIONS))[0] == 401
    assert (await both_ways_alike(relay, NOTIFICATIONS, token="not-a-jwt"))[0] == 401
    expired = relay.token("u1", ttl=-60)
    assert (await both_ways_alike(relay, f"/api/upload/sessions/{session}/stream", token=expired))[
        0
    ] == 401
    other = relay.token("intruder")
    assert (await both_ways_alike(relay, f"/api/upload/sessions/{session}/stream", token=other))[
        0
    ] == 403
    assert (await both_ways_alike(relay, "/api/upload/sessions/bad!id/stream", token=other))[
        0
    ] == 400


async def test_streams_are_the_same_both_ways(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session, user = ids("s"), ids("u")
    await seed.start(session, user, 3)
    logged = await seed.upload_many(session, 2)
    token = relay.token(user)
    stream_path = f"/api/upload/sessions/{session}/stream"
    snapshot = await both_ways_alike(relay, stream_path, token=token)
    assert snapshot[0] == 200
    assert snapshot[4][1] == "SESSION_SNAPSHOT"
    # Resuming, by header and by query (the header wins when both are sent)
    for kwargs in (
        {"last_event_id": logged[0]},
        {"params": {"lastEventId": logged[0]}},
        {"last_event_id": logged[0], "params": {"lastEventId": "1-0"}},
    ):
        replayed = await both_ways_alike(relay, stream_path, token=token, **kwargs)
        assert replayed[4][2] == logged[1]
    for via in ("header", "cookie", "query"):
        pending = await both_ways_alike(
            relay, f"/api/upload/sessions/{ids('pending')}/stream", token=token, via=via, live=True
        )
        assert pending[0] == 200
        notes = await both_ways_alike(relay, NOTIFICATIONS, token=token, via=via, live=True)
        assert notes[0] == 200


async def test_a_completed_session_is_204_both_ways(relay: Relay, seed: Seeder, ids: Ids) -> None:
    session = ids("s")
    await seed.start(session, "u1", 1)
    last = (await seed.upload(session, "p0")).event_ids[-1]
    done = await both_ways_alike(
        relay, f"/api/upload/sessions/{session}/stream", token=relay.token("u1"), last_event_id=last
    )
    assert done[0] == 204
