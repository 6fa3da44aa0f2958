"""PROTOCOL §5 authentication over real HTTP: token sources and their order, every 401, leeway.

All against a real relay process (``relay`` is shared; settings-specific cases start their own).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from rapidphoto_contract.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.relay.conftest import Relay, RelayFactory
from tests.support.sse import open_sse

NOTIFICATIONS = "/api/upload/sessions/notifications/stream"
INVALID = 'Bearer error="invalid_token"'


async def _status(relay: Relay, path: str = NOTIFICATIONS, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with open_sse(relay.base_url, path, **kwargs) as stream:
        if stream.status_code == 200:
            await stream.next_frame()  # the retry frame: the stream really is open
        return stream.status_code, stream.headers, stream.body


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


@pytest.mark.parametrize("via", ["header", "cookie", "query"])
async def test_each_token_source_authenticates(relay: Relay, via: str) -> None:
    status, headers, _ = await _status(relay, token=relay.token("u1"), via=via)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"


async def test_missing_token_is_401_with_bare_bearer_challenge(relay: Relay) -> None:
    status, headers, body = await _status(relay)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"].startswith("application/json")
    assert set(json.loads(body)) == {"error"}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "u1", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


BAD_TOKENS: dict[str, Callable[[Relay], str]] = {
    "bad-signature": lambda r: mint_token("u1", key="another-secret-that-is-32-bytes-long!!"),
    "expired": lambda r: r.token("u1", ttl=-10),
    "malformed-garbage": lambda r: "not-a-jwt",
    "malformed-three-parts": lambda r: "aaa.bbb.ccc",
    "empty": lambda r: "",
    "alg-none": lambda r: _unsigned(_claims()),
    "unlisted-alg": lambda r: mint_token("u1", key=r.secret * 2, algorithm="HS512"),
    "sub-not-an-id": lambda r: mint_token("a:b", key=r.secret),
    "sub-too-long": lambda r: mint_token("x" * 129, key=r.secret),
    "no-sub": lambda r: __import__("jwt").encode(_claims(sub=None), r.secret, algorithm="HS256"),
    "no-exp": lambda r: __import__("jwt").encode(_claims(exp=None), r.secret, algorithm="HS256"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_invalid_tokens_are_401_invalid_token_without_echoing_it(
    relay: Relay, case: str
) -> None:
    token = BAD_TOKENS[case](relay)
    status, headers, body = await _status(relay, token=token, via="query")
    assert status == 401
    assert headers["www-authenticate"] == INVALID
    error = json.loads(body)
    assert set(error) == {"error"}
    if token:
        assert token not in body.decode()


async def test_first_present_source_decides(relay: Relay) -> None:
    good, bad = relay.token("u1"), relay.token("u1", ttl=-10)
    # an invalid header token is a 401 even with a valid cookie and query token
    status, headers, _ = await _status(
        relay,
        token=bad,
        via="header",
        headers={"Cookie": f"access_token={good}"},
        params={"access_token": good},
    )
    assert (status, headers["www-authenticate"]) == (401, INVALID)
    # a valid header wins over an invalid cookie
    status, _, _ = await _status(relay, token=good, headers={"Cookie": f"access_token={bad}"})
    assert status == 200
    # the cookie comes before the query parameter
    status, _, _ = await _status(relay, token=bad, via="cookie", params={"access_token": good})
    assert status == 401
    status, _, _ = await _status(relay, token=good, via="cookie", params={"access_token": bad})
    assert status == 200


async def test_non_bearer_authorization_is_not_a_token_source(relay: Relay) -> None:
    status, _, _ = await _status(
        relay, headers={"Authorization": "Basic dTpw"}, params={"access_token": relay.token("u1")}
    )
    assert status == 200
    status, headers, _ = await _status(relay, headers={"Authorization": "Basic dTpw"})
    assert (status, headers["www-authenticate"]) == (401, "Bearer")


@pytest.mark.parametrize("session_id", ["a:b", "x" * 129, "notifications"])
async def test_authentication_comes_before_id_validation(relay: Relay, session_id: str) -> None:
    status, headers, _ = await _status(relay, f"/api/upload/sessions/{session_id}/stream")
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    status, headers, _ = await _status(
        relay, f"/api/upload/sessions/{session_id}/stream", token="garbage"
    )
    assert (status, headers["www-authenticate"]) == (401, INVALID)


async def test_authentication_comes_before_ownership(relay: Relay, seed: Any, ids: Any) -> None:
    session = ids("s")
    await seed.start(session, "owner1", 2)
    path = f"/api/upload/sessions/{session}/stream"
    status, _, _ = await _status(relay, path)
    assert status == 401
    status, _, _ = await _status(relay, path, token=relay.token("intruder"))
    assert status == 403


async def test_issuer_audience_and_cookie_name_settings(relay_factory: RelayFactory) -> None:
    relay = relay_factory(
        JWT_ISSUER="https://issuer.example", JWT_AUDIENCE="rapidphoto", JWT_COOKIE_NAME="rp_auth"
    )
    right: dict[str, Any] = {"issuer": "https://issuer.example", "audience": "rapidphoto"}
    assert (await _status(relay, token=relay.token("u1", **right)))[0] == 200
    # JWT_COOKIE_NAME: the configured cookie is read, the default name is not a source any more
    good = relay.token("u1", **right)
    assert (await _status(relay, token=good, via="cookie", cookie_name="rp_auth"))[0] == 200
    status, headers, _ = await _status(relay, token=good, via="cookie")
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    wrong: tuple[dict[str, Any], ...] = (
        {"issuer": "https://evil.example", "audience": "rapidphoto"},
        {"issuer": "https://issuer.example", "audience": "other"},
        {},
    )
    for claims in wrong:
        status, headers, _ = await _status(relay, token=relay.token("u1", **claims))
        assert (status, headers["www-authenticate"]) == (401, INVALID), claims


async def test_leeway_accepts_a_recently_expired_token(relay_factory: RelayFactory) -> None:
    relay = relay_factory(JWT_LEEWAY_SECONDS="60")
    assert (await _status(relay, token=relay.token("u1", ttl=-20)))[0] == 200
    assert (await _status(relay, token=relay.token("u1", ttl=-120)))[0] == 401


async def test_auth_failures_are_counted_by_reason(relay: Relay) -> None:
    before = relay.metric("rapidphoto_relay_auth_failures_total", 'reason="expired"')
    await _status(relay, token=relay.token("u1", ttl=-10))
    assert relay.metric("rapidphoto_relay_auth_failures_total", 'reason="expired"') == before + 1


async def test_rs256_with_a_public_key(relay_factory: RelayFactory) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    relay = relay_factory(JWT_SECRET="", JWT_ALGORITHMS="RS256", JWT_PUBLIC_KEY=public_pem)
    good = mint_token("u1", key=private_pem, algorithm="RS256")
    assert (await _status(relay, token=good))[0] == 200
    hs = mint_token("u1", key=TEST_SECRET)  # HS256 is not listed: refused, not tried with the PEM
    status, headers, _ = await _status(relay, token=hs)
    assert (status, headers["www-authenticate"]) == (401, INVALID)
