"""Liveness and readiness (PROTOCOL §5), and the service description at ``/api/realtime/info``.

Ready means this process can serve a stream right now: its pub/sub connection is up with every
channel confirmed, and the commands connection answers a PING. A load balancer should stop sending
new clients to a relay that is not ready; its open streams stay open on heartbeats meanwhile.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from rapidphoto_contract.events import MESSAGE_TYPES
from rapidphoto_relay.services import RelayServices


class Readiness(TypedDict):
    """The body of ``/health/ready``, whatever its status."""

    status: Literal["ready", "unavailable"]
    redis: bool
    subscription: bool
    openStreams: int


@get("/health/live", summary="The process is up", tags=["health"], sync_to_thread=False)
def live() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/health/ready",
    summary="Redis and the subscription are up",
    tags=["health"],
    responses={
        503: ResponseSpec(
            Readiness,
            description="Redis or the subscription is down, or the relay is shutting down",
            generate_examples=False,
        )
    },
)
async def ready(services: NamedDependency[RelayServices]) -> Response[Readiness]:
    redis_ok = await services.redis_reachable()
    subscription_ok = services.hub.ready
    ok = redis_ok and subscription_ok and not services.registry.shutting_down
    body: Readiness = {
        "status": "ready" if ok else "unavailable",
        "redis": redis_ok,
        "subscription": subscription_ok,
        "openStreams": len(services.registry),
    }
    return Response(
        body,
        status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
    )


@get("/api/realtime/info", summary="How to subscribe", tags=["info"], sync_to_thread=False)
def info() -> dict[str, Any]:
    return {
        "sessionStreamEndpoint": "/api/upload/sessions/{sessionId}/stream",
        "notificationStreamEndpoint": "/api/upload/sessions/notifications/stream",
        "multiSessionStreamEndpoint": "/api/upload/sessions/stream",
        "protocol": "SSE",
        "messageTypes": list(MESSAGE_TYPES),
    }
