"""The relay's HTTP errors: values with names (CONVENTIONS §8), rendered as ``{"error": "..."}``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from litestar.openapi.datastructures import ResponseSpec


@dataclass(frozen=True)
class ErrorBody:
    """The body of every error answer, as the OpenAPI document describes it."""

    error: str


def error_response(description: str) -> ResponseSpec:
    """An error status of the OpenAPI document: ``{"error": "..."}``, as every error is rendered."""
    return ResponseSpec(ErrorBody, description=description, generate_examples=False)


class RelayHTTPError(Exception):
    """An error answer: status, a short message (never a token) and extra headers."""

    status_code = 500

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(message)


class Unauthorized(RelayHTTPError):
    """401 (PROTOCOL §5): ``WWW-Authenticate: Bearer`` when no token, ``error="invalid_token"`` else."""

    status_code = 401

    def __init__(self, message: str, *, invalid: bool) -> None:
        challenge = 'Bearer error="invalid_token"' if invalid else "Bearer"
        super().__init__(message, {"WWW-Authenticate": challenge})


class BadRequest(RelayHTTPError):
    status_code = 400


class Forbidden(RelayHTTPError):
    status_code = 403


class TooManyStreams(RelayHTTPError):
    status_code = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)})


class Unavailable(RelayHTTPError):
    status_code = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)})
