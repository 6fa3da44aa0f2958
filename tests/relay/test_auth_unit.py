"""Token source order (PROTOCOL §5), in-process: the first source present decides."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.connection import ASGIConnection

from rapidphoto_relay.auth import find_token


def _connection(headers: dict[str, str], query: str = "") -> ASGIConnection[Any, Any, Any, Any]:
    scope: Any = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "state": {},
    }
    return ASGIConnection(scope)


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Authorization": "Bearer H"}, "access_token=Q", ("header", "H")),
        ({"Authorization": "bearer H", "Cookie": "access_token=C"}, "", ("header", "H")),
        ({"Cookie": "access_token=C"}, "access_token=Q", ("cookie", "C")),
        ({}, "access_token=Q", ("query", "Q")),
        ({"Authorization": "Basic x"}, "access_token=Q", ("query", "Q")),
        ({"Authorization": "Bearer "}, "access_token=Q", ("header", "")),
        ({"Cookie": "other=1"}, "", None),
        ({}, "", None),
    ],
)
def test_first_present_source_decides(
    headers: dict[str, str], query: str, expected: tuple[str, str] | None
) -> None:
    assert find_token(_connection(headers, query), "access_token") == expected


def test_cookie_name_is_configurable() -> None:
    conn = _connection({"Cookie": "access_token=A; sid=S"})
    assert find_token(conn, "sid") == ("cookie", "S")
