"""What the ``rapidphoto`` commands share: exit statuses, argument types, errors, the client."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError

from rapidphoto_contract.settings import ConfigError, JwtConfig
from rapidphoto_contract.tokens import mint_for_settings
from rapidphoto_tools.client import UploadJobsClient

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

T = TypeVar("T")


# --- argument types (argparse turns their errors into "argument --x: ..." and exit 2) ------------


def int_between(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def float_between(lo: float, hi: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > lo if open_low else value >= lo
        if not (math.isfinite(value) and low_ok and value <= hi):
            bound = f"above {lo:g}" if open_low else f"at least {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {hi:g}, got {text}")
        return value

    return parse


def error(message: str) -> None:
    print(f"rapidphoto: error: {message}", file=sys.stderr)


def dev_token(user_id: str, ttl_seconds: float = 3600) -> str:
    """A development token for ``user_id``, signed with ``JWT_SECRET`` (``rapidphoto token``)."""
    settings = JwtConfig.from_env()
    if settings.jwt_secret is None:
        raise ConfigError("JWT_SECRET", "not set; development tokens are signed with it")
    try:
        return mint_for_settings(user_id, settings, ttl_seconds=ttl_seconds)
    except ValueError as exc:  # no HS* algorithm listed
        raise ConfigError("JWT_ALGORITHMS", str(exc)) from None


class RedisUnavailable(Exception):
    pass


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_jobs(redis_url: str, use: Callable[[UploadJobsClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with UploadJobsClient.connect(redis_url) as jobs:
            return await use(jobs)

    try:
        return asyncio.run(go())
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(f"Redis at {redact_url(redis_url)}: {exc}") from None
