"""JWT mint/verify with pinned algorithms (PROTOCOL §5): every way a token can fail, and why."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rapidphoto_contract.settings import ConfigError, RelayConfig
from rapidphoto_contract.tokens import (
    FAILURE_TEXT,
    InvalidToken,
    Principal,
    TokenFailure,
    TokenVerifier,
    _FastSegments,
    mint_for_settings,
    mint_token,
)
from tests.support.keypairs import KeyPair, ec_pair, rsa_pair
from tests.support.properties import PROPERTY

# 64 bytes: long enough for HS512 too (RFC 7518 §3.2), so PyJWT never warns.
SECRET = "contract-tests-secret-0123456789abcdef-0123456789abcdef-01234567"
OTHER_SECRET = "another-secret-0123456789abcdef-0123456789abcdef-0123456789abcde"


def hs_verifier(**settings: Any) -> TokenVerifier:
    return TokenVerifier(RelayConfig(jwt_secret=SECRET, **settings))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token built without PyJWT, for the ones PyJWT refuses to produce."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def expect_failure(verifier: TokenVerifier, token: str, reason: TokenFailure) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    assert info.value.reason == reason
    assert str(info.value) == FAILURE_TEXT[reason]
    # PROTOCOL §5: error bodies never echo the token; nor does anything chained to the error.
    if token:
        assert token not in str(info.value)
        assert token not in repr(info.value)
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return info.value


# --- round trips ---------------------------------------------------------------------------------


def test_hs256_round_trip() -> None:
    now = time.time()
    token = mint_token("user-1", key=SECRET, now=now, ttl_seconds=600)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    principal = hs_verifier().verify(token)
    assert principal == Principal(user_id="user-1", expires_at=float(int(now + 600)))


def test_rs256_round_trip(rsa_keys: KeyPair) -> None:
    verifier = TokenVerifier(
        RelayConfig(jwt_public_key=rsa_keys.public_pem, jwt_algorithms=("RS256",))
    )
    token = mint_token("u1", key=rsa_keys.private_pem, algorithm="RS256")
    assert verifier.verify(token).user_id == "u1"


def test_es256_round_trip(ec_keys: KeyPair) -> None:
    verifier = TokenVerifier(
        RelayConfig(jwt_public_key=ec_keys.public_pem, jwt_algorithms=("ES256",))
    )
    token = mint_token("u1", key=ec_keys.private_pem, algorithm="ES256")
    assert verifier.verify(token).user_id == "u1"


def test_mixed_algorithms_pick_the_key_by_alg(rsa_keys: KeyPair) -> None:
    verifier = TokenVerifier(
        RelayConfig(
            jwt_secret=SECRET,
            jwt_public_key=rsa_keys.public_pem,
            jwt_algorithms=("HS256", "RS256"),
        )
    )
    assert verifier.verify(mint_token("a", key=SECRET)).user_id == "a"
    assert (
        verifier.verify(mint_token("b", key=rsa_keys.private_pem, algorithm="RS256")).user_id == "b"
    )


def test_mint_token_claims() -> None:
    token = mint_token(
        "u1", key=SECRET, now=1_000_000, ttl_seconds=60, issuer="i", audience="a", extra={"x": 1}
    )
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_signature": False})
    assert claims == {
        "sub": "u1",
        "iat": 1_000_000,
        "exp": 1_000_060,
        "iss": "i",
        "aud": "a",
        "x": 1,
    }


def test_issuer_and_audience_accepted_when_they_match() -> None:
    verifier = hs_verifier(jwt_issuer="https://auth.example", jwt_audience="relay")
    token = mint_token("u1", key=SECRET, issuer="https://auth.example", audience="relay")
    assert verifier.verify(token).user_id == "u1"
    listed = mint_token(
        "u1", key=SECRET, issuer="https://auth.example", extra={"aud": ["x", "relay"]}
    )
    assert verifier.verify(listed).user_id == "u1"


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        TokenVerifier(RelayConfig())
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY"):
        TokenVerifier(RelayConfig(jwt_secret=SECRET, jwt_algorithms=("ES256",)))


# --- failures ------------------------------------------------------------------------------------


def test_expired() -> None:
    token = mint_token("u1", key=SECRET, now=time.time() - 7200, ttl_seconds=3600)
    expect_failure(hs_verifier(), token, "expired")


def test_bad_signature_hs256() -> None:
    token = mint_token("u1", key=OTHER_SECRET)
    expect_failure(hs_verifier(), token, "bad-signature")


def test_bad_signature_tampered_claims() -> None:
    head, _, sig = mint_token("alice", key=SECRET).split(".")
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    expect_failure(hs_verifier(), f"{head}.{body}.{sig}", "bad-signature")


def test_bad_signature_rs256(rsa_keys: KeyPair) -> None:
    verifier = TokenVerifier(
        RelayConfig(jwt_public_key=rsa_keys.public_pem, jwt_algorithms=("RS256",))
    )
    other = rsa_pair()
    expect_failure(
        verifier, mint_token("u1", key=other.private_pem, algorithm="RS256"), "bad-signature"
    )


def test_bad_signature_es256(ec_keys: KeyPair) -> None:
    verifier = TokenVerifier(
        RelayConfig(jwt_public_key=ec_keys.public_pem, jwt_algorithms=("ES256",))
    )
    other = ec_pair()
    expect_failure(
        verifier, mint_token("u1", key=other.private_pem, algorithm="ES256"), "bad-signature"
    )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJIUzI1NiJ9",  # a header alone
        "é.é.é",
        "Bearer x.y.z",
    ],
)
def test_malformed(token: str) -> None:
    expect_failure(hs_verifier(), token, "malformed")


def test_malformed_payload_with_a_valid_header() -> None:
    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = "not-base64-json!"
    signing_input = f"{head}.{body}".encode()
    sig = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    expect_failure(hs_verifier(), f"{head}.{body}.{b64(sig)}", "malformed")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = hand_made({"alg": alg, "typ": "JWT"}, {"sub": "u1", "exp": int(time.time()) + 600})
    assert token.endswith(".")
    expect_failure(hs_verifier(), token, "algorithm")
    # Even when (wrongly) asked to: RelayConfig refuses to list it at all.
    with pytest.raises(ConfigError, match="none"):
        RelayConfig.from_env({"JWT_ALGORITHMS": alg})


def test_header_without_alg() -> None:
    token = hand_made({"typ": "JWT"}, {"sub": "u1", "exp": int(time.time()) + 600}, b"x")
    expect_failure(hs_verifier(), token, "algorithm")


def test_algorithm_not_listed() -> None:
    expect_failure(hs_verifier(), mint_token("u1", key=SECRET, algorithm="HS512"), "algorithm")


def test_rs256_token_when_only_hs256_listed(rsa_keys: KeyPair) -> None:
    token = mint_token("u1", key=rsa_keys.private_pem, algorithm="RS256")
    expect_failure(hs_verifier(), token, "algorithm")


def test_algorithm_confusion_with_the_public_key_as_hmac_secret(rsa_keys: KeyPair) -> None:
    """The classic attack: sign HS256 with the (public) RSA key's PEM as the HMAC secret."""
    claims = {"sub": "u1", "exp": int(time.time()) + 600}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(rsa_keys.public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{b64(sig)}"
    rs_only = TokenVerifier(
        RelayConfig(jwt_public_key=rsa_keys.public_pem, jwt_algorithms=("RS256",))
    )
    expect_failure(rs_only, token, "algorithm")
    both = TokenVerifier(
        RelayConfig(
            jwt_secret=SECRET, jwt_public_key=rsa_keys.public_pem, jwt_algorithms=("HS256", "RS256")
        )
    )
    expect_failure(both, token, "bad-signature")


def test_listed_algorithm_that_does_not_fit_the_key(rsa_keys: KeyPair, ec_keys: KeyPair) -> None:
    """Regression: with ``JWT_ALGORITHMS=RS256,ES256`` and an EC key, an RS256 token made PyJWT
    raise ``InvalidKeyError``, which is not an ``InvalidTokenError``: it escaped ``verify`` (a 500
    in the relay instead of a 401)."""
    verifier = TokenVerifier(
        RelayConfig(jwt_public_key=ec_keys.public_pem, jwt_algorithms=("RS256", "ES256"))
    )
    token = mint_token("u1", key=rsa_keys.private_pem, algorithm="RS256")
    expect_failure(verifier, token, "algorithm")
    assert verifier.verify(mint_token("u1", key=ec_keys.private_pem, algorithm="ES256"))


def test_wrong_issuer() -> None:
    verifier = hs_verifier(jwt_issuer="https://auth.example")
    expect_failure(verifier, mint_token("u1", key=SECRET, issuer="https://evil.example"), "issuer")


def test_missing_issuer() -> None:
    """Regression: a token without ``iss`` (when one is configured) failed as "claims" (``lacks a
    required claim (exp, sub)``), which named the wrong claim."""
    verifier = hs_verifier(jwt_issuer="https://auth.example")
    expect_failure(verifier, mint_token("u1", key=SECRET), "issuer")


def test_wrong_audience() -> None:
    verifier = hs_verifier(jwt_audience="relay")
    expect_failure(verifier, mint_token("u1", key=SECRET, audience="billing"), "audience")
    expect_failure(verifier, mint_token("u1", key=SECRET, extra={"aud": 5}), "audience")


def test_missing_audience() -> None:
    """Regression: same as ``iss``, a missing ``aud`` failed as "claims"."""
    expect_failure(hs_verifier(jwt_audience="relay"), mint_token("u1", key=SECRET), "audience")


def test_audience_in_token_but_none_configured() -> None:
    """RFC 7519 §4.1.3: a recipient that does not identify itself with ``aud`` must reject it."""
    expect_failure(hs_verifier(), mint_token("u1", key=SECRET, audience="relay"), "audience")


def test_missing_exp() -> None:
    token = jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256")
    expect_failure(hs_verifier(), token, "claims")


def test_missing_sub() -> None:
    token = jwt.encode({"exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    expect_failure(hs_verifier(), token, "claims")
    null_sub = jwt.encode({"sub": None, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    expect_failure(hs_verifier(), null_sub, "claims")


def test_exp_not_a_number() -> None:
    token = jwt.encode({"sub": "u1", "exp": "tomorrow"}, SECRET, algorithm="HS256")
    expect_failure(hs_verifier(), token, "malformed")


@pytest.mark.parametrize("sub", ["a:b", "a*", "", "a b", "é", "x" * 129])
def test_sub_not_an_id(sub: str) -> None:
    expect_failure(hs_verifier(), mint_token(sub, key=SECRET), "subject")


@pytest.mark.parametrize("sub", [123, ["u1"], {"id": "u1"}, True])
def test_sub_not_a_string(sub: object) -> None:
    """Regression: PyJWT >= 2.10 raises ``InvalidSubjectError`` for a non-string ``sub`` itself,
    which surfaced as "malformed" rather than "subject"."""
    token = hand_made(
        {"alg": "HS256", "typ": "JWT"}, {"sub": sub, "exp": int(time.time()) + 600}
    ).rsplit(".", 1)[0]
    sig = hmac.new(SECRET.encode(), token.encode(), hashlib.sha256).digest()
    expect_failure(hs_verifier(), f"{token}.{b64(sig)}", "subject")


# --- leeway --------------------------------------------------------------------------------------


def test_leeway_honoured_for_exp() -> None:
    token = mint_token("u1", key=SECRET, now=time.time() - 3610, ttl_seconds=3600)  # 10 s ago
    expect_failure(hs_verifier(jwt_leeway_seconds=0), token, "expired")
    expect_failure(hs_verifier(jwt_leeway_seconds=5), token, "expired")
    assert hs_verifier(jwt_leeway_seconds=30).verify(token).user_id == "u1"


def test_leeway_honoured_for_nbf() -> None:
    """Regression: a token not valid yet surfaced as "malformed"; it is now "not-yet-valid"."""
    token = mint_token("u1", key=SECRET, extra={"nbf": int(time.time()) + 10})
    expect_failure(hs_verifier(jwt_leeway_seconds=0), token, "not-yet-valid")
    assert hs_verifier(jwt_leeway_seconds=30).verify(token).user_id == "u1"


def test_leeway_honoured_for_iat() -> None:
    token = mint_token("u1", key=SECRET, now=time.time() + 10)  # issuer's clock is ahead
    expect_failure(hs_verifier(jwt_leeway_seconds=0), token, "not-yet-valid")
    assert hs_verifier(jwt_leeway_seconds=30).verify(token).user_id == "u1"


# --- mint_for_settings ---------------------------------------------------------------------------


def test_mint_for_settings_is_accepted_by_the_same_settings() -> None:
    settings = RelayConfig(
        jwt_secret=SECRET,
        jwt_algorithms=("RS256", "HS384"),
        jwt_issuer="iss",
        jwt_audience="aud",
    )
    token = mint_for_settings("u1", settings, ttl_seconds=60)
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    principal = TokenVerifier(
        RelayConfig(
            jwt_secret=SECRET, jwt_algorithms=("HS384",), jwt_issuer="iss", jwt_audience="aud"
        )
    ).verify(token)
    assert principal.user_id == "u1"
    assert principal.expires_at - time.time() == pytest.approx(60, abs=2)


def test_mint_for_settings_needs_a_secret_and_an_hs_algorithm(rsa_keys: KeyPair) -> None:
    with pytest.raises(ValueError, match="JWT_SECRET"):
        mint_for_settings("u1", RelayConfig())
    with pytest.raises(ValueError, match="HS"):
        mint_for_settings("u1", RelayConfig(jwt_secret=SECRET, jwt_algorithms=("RS256",)))


def test_failure_texts_cover_every_reason() -> None:
    assert set(FAILURE_TEXT) == set(TokenFailure.__args__)  # type: ignore[attr-defined]


def prepared_counts(verifier: TokenVerifier) -> dict[str, int]:
    """How often each algorithm of ``verifier`` prepared the configured key."""
    jws = verifier._jws
    return {
        alg: jws.get_algorithm_by_name(alg).prepared_count  # type: ignore[attr-defined]
        for alg in verifier._algorithms
    }


def test_the_key_is_prepared_once_not_per_token(rsa_keys: KeyPair) -> None:
    """PyJWT prepares (checks, parses) the key on every decode; the verifier does it once."""
    verifier = TokenVerifier(
        RelayConfig(
            jwt_secret=SECRET, jwt_public_key=rsa_keys.public_pem, jwt_algorithms=("HS256", "RS256")
        )
    )
    for n in range(5):
        assert verifier.verify(mint_token(f"a{n}", key=SECRET)).user_id == f"a{n}"
        rs = mint_token(f"b{n}", key=rsa_keys.private_pem, algorithm="RS256")
        assert verifier.verify(rs).user_id == f"b{n}"
    assert prepared_counts(verifier) == {"HS256": 1, "RS256": 1}
    # The prepared key still refuses what it must.
    expect_failure(verifier, mint_token("a", key=OTHER_SECRET), "bad-signature")
    expect_failure(verifier, mint_token("a", key=SECRET, ttl_seconds=-60), "expired")


def test_a_secret_pyjwt_refuses_fails_every_token(rsa_keys: KeyPair) -> None:
    """PyJWT refuses an HMAC secret that is a PEM key: the refusal is not cached as a key."""
    verifier = TokenVerifier(RelayConfig(jwt_secret=rsa_keys.public_pem))
    claims = {"sub": "u1", "exp": int(time.time()) + 600}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(rsa_keys.public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    for _ in range(3):
        expect_failure(verifier, f"{head}.{body}.{b64(sig)}", "algorithm")
    assert prepared_counts(verifier) == {"HS256": 0}


def _segment_outcome(decode: Callable[[bytes, str], bytes], segment: bytes) -> bytes | str:
    try:
        return decode(segment, "header")
    except jwt.DecodeError as exc:
        return str(exc)


@PROPERTY
@given(
    st.one_of(
        st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw)),
        st.text(alphabet="AQgw_-09az=!+/ .\n", max_size=24).map(str.encode),
        st.binary(max_size=24),
    )
)
@example(b"")
@example(b"AA==")
@example(b"AB==")  # not canonical: the low bits of B are not zero
@example(b"AAA=")
@example(b"A===")
@example(b"AAAAA")
def test_fast_segment_decoding_is_pyjwts(segment: bytes) -> None:
    """The verifier's segment decoding (tokens._FastSegments) accepts and refuses exactly what
    PyJWT's own does, with the same message."""
    fast = _segment_outcome(_FastSegments._decode_base64url_segment, segment)
    assert fast == _segment_outcome(jwt.PyJWS._decode_base64url_segment, segment)
