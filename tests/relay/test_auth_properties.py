"""Properties of the token sources (PROTOCOL §5; issue 9): arbitrary header, cookie and query values.

At the unit level through :class:`Authenticator` (the guard's work) on ASGI scopes carrying any
bytes, and a small sample over real HTTP against the shared relay.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from litestar.connection import ASGIConnection

from rapidphoto_contract.settings import RelayConfig
from rapidphoto_contract.tokens import FAILURE_TEXT, TokenVerifier, mint_token
from rapidphoto_relay.auth import QUERY_PARAMETER, Authenticator, find_token
from rapidphoto_relay.errors import Unauthorized
from rapidphoto_relay.metrics import RelayMetrics
from tests.conftest import TEST_SECRET
from tests.relay.conftest import Relay

PROPERTY = settings(max_examples=400, deadline=None)
COOKIE = "access_token"
AUTHENTICATOR = Authenticator(
    TokenVerifier(RelayConfig(jwt_secret=TEST_SECRET)), COOKIE, RelayMetrics()
)
#: Every text a 401 body may hold: fixed sentences, so a token can never be echoed.
MESSAGES = {*FAILURE_TEXT.values(), "authentication required: send a bearer token"}
MISSING = "Bearer"
INVALID = 'Bearer error="invalid_token"'

#: Token-ish values: arbitrary text, JWT-shaped junk, and a forged token (wrong key, alg none).
token_like = st.one_of(
    st.text(),
    st.lists(
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="), max_size=4
    ).map(".".join),
    st.builds(lambda sub: mint_token(sub, key="x" * 32), st.text(max_size=20)),
    st.just("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ."),
)
header_values = st.none() | st.binary(max_size=200) | token_like.map(lambda t: f"Bearer {t}")


def _latin1(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _connection(
    authorization: bytes | str | None, cookie: bytes | str | None, query: bytes
) -> ASGIConnection[Any, Any, Any, Any]:
    headers: list[tuple[bytes, bytes]] = []
    if authorization is not None:
        value = authorization if isinstance(authorization, bytes) else _latin1(authorization)
        headers.append((b"authorization", value))
    if cookie is not None:
        headers.append((b"cookie", cookie if isinstance(cookie, bytes) else _latin1(cookie)))
    scope: Any = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": query,
        "headers": headers,
        "state": {},
    }
    return ASGIConnection(scope)


cookies = st.none() | st.binary(max_size=200) | token_like.map(lambda t: f"{COOKIE}={t}")
queries = (
    st.binary(max_size=200)
    | token_like.map(lambda t: f"{QUERY_PARAMETER}={quote(t, errors='surrogatepass')}".encode())
    | st.text().map(lambda t: f"{QUERY_PARAMETER}={t}".encode("utf-8", "surrogatepass"))
)


@PROPERTY
@given(authorization=header_values, cookie=cookies, query=queries)
@example(authorization=None, cookie=None, query=b"access_token=%ED%A0%80")  # a lone surrogate
@example(authorization=b"Bearer \xff\xfe", cookie=None, query=b"")
@example(authorization=None, cookie=b"access_token=\xff", query=b"")
@example(authorization=b"Basic abc", cookie=b"a=b; access_token", query=b"access_token")
def test_any_token_source_value_is_a_clean_401(
    authorization: bytes | str | None, cookie: bytes | str | None, query: bytes
) -> None:
    """Rule (PROTOCOL §5): whatever the ``Authorization`` header, cookie and ``access_token`` query
    hold (none of them a valid token), the answer is 401 with ``WWW-Authenticate: Bearer`` when no
    source is present and ``Bearer error="invalid_token"`` when one is, and a body that is one of
    a few fixed sentences (so it never echoes the token); never another error (a 5xx)."""
    connection = _connection(authorization, cookie, query)
    with pytest.raises(Unauthorized) as info:  # anything else fails the test
        AUTHENTICATOR.authenticate(connection)
    assert info.value.status_code == 401
    present = find_token(connection, COOKIE) is not None
    assert info.value.headers == {"WWW-Authenticate": INVALID if present else MISSING}
    assert info.value.message in MESSAGES


@PROPERTY
@given(cookie=cookies, query=queries, junk=token_like)
def test_the_first_source_present_decides(
    cookie: bytes | str | None, query: bytes, junk: str
) -> None:
    """Rule (PROTOCOL §5): an invalid bearer token is refused even when a valid token sits in the
    cookie or the query: the first source present decides."""
    valid = mint_token("u1", key=TEST_SECRET)
    connection = _connection(
        f"Bearer {junk}x", f"{COOKIE}={valid}", f"access_token={valid}".encode()
    )
    with pytest.raises(Unauthorized) as info:
        AUTHENTICATOR.authenticate(connection)
    assert info.value.headers == {"WWW-Authenticate": INVALID}


#: Visible ASCII: what an HTTP client sends in a header value without refusing it.
printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(header=st.none() | printable, cookie=st.none() | printable, query=st.none() | printable)
def test_over_http_any_token_gets_401_without_echo(
    relay: Relay, header: str | None, cookie: str | None, query: str | None
) -> None:
    """Rule (PROTOCOL §5), through the real relay: any visible-ASCII header, cookie and query token gets
    401 with the right ``WWW-Authenticate`` and a JSON error that does not echo the token."""
    headers = {} if header is None else {"Authorization": f"Bearer {header}"}
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    params = {} if query is None else {QUERY_PARAMETER: query}
    response = relay.get(
        "/api/upload/sessions/notifications/stream", headers=headers, params=params
    )
    assert response.status_code == 401
    present = header is not None or cookie is not None or query is not None
    assert response.headers["WWW-Authenticate"] in ({INVALID, MISSING} if present else {MISSING})
    body = response.json()
    assert body["error"] in MESSAGES
    for value in (header, cookie, query):
        if value is not None and len(value) >= 8:
            assert value not in response.text
