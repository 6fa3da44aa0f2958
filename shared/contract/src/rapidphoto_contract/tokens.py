"""JWT helpers with pinned algorithms (PROTOCOL §5), built on PyJWT.

:class:`TokenVerifier` is what the relay uses: it only accepts the algorithms listed in the
settings, requires ``exp`` and ``sub``, checks ``iss``/``aud`` when configured and reports *why* a
token failed as a short, token-free reason (for metrics and error bodies). :func:`mint_token` is for
development, tests and load tests.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias

import attrs
import jwt
from jwt.algorithms import Algorithm
from jwt.exceptions import InvalidSubjectError

from rapidphoto_contract.ids import is_valid_id
from rapidphoto_contract.settings import JwtConfig

TokenFailure: TypeAlias = Literal[
    "expired",
    "not-yet-valid",
    "bad-signature",
    "malformed",
    "algorithm",
    "issuer",
    "audience",
    "subject",
    "claims",
]

#: Short human text for each failure, used in 401 bodies; never includes the token itself.
FAILURE_TEXT: Final[dict[str, str]] = {
    "expired": "token expired",
    "not-yet-valid": "token is not valid yet (nbf/iat in the future)",
    "bad-signature": "token signature is invalid",
    "malformed": "token is malformed",
    "algorithm": "token algorithm is not accepted",
    "issuer": "token issuer is not accepted",
    "audience": "token audience is not accepted",
    "subject": "token subject is not a valid user id",
    "claims": "token lacks a required claim (exp, sub)",
}

#: A missing ``iss``/``aud`` fails the issuer/audience check, not the generic claims one.
_MISSING_CLAIM: Final[dict[str, TokenFailure]] = {"iss": "issuer", "aud": "audience"}


class InvalidToken(Exception):
    """Verification failed; ``reason`` is one of :data:`TokenFailure`."""

    def __init__(self, reason: TokenFailure) -> None:
        self.reason: TokenFailure = reason
        super().__init__(FAILURE_TEXT[reason])


@attrs.frozen
class Principal:
    """The authenticated caller: ``sub`` and the token's expiry (epoch seconds)."""

    user_id: str
    expires_at: float


class _PreparedKey(Algorithm):
    """One of PyJWT's algorithms, preparing the configured key once instead of on every token.

    PyJWT prepares the key for each ``decode``: for an HMAC secret it checks that the secret is no
    PEM, DER or JSON key (a ``json.loads`` of the secret each time), for a public key it parses the
    PEM. That was ~7 % of a stream open (``loadtests/results/storm``). The checks still run, once,
    on the first token (a key they refuse fails that token and every later one, as before); any
    other key is prepared as usual.
    """

    def __init__(self, algorithm: Algorithm, key: Any) -> None:
        self._algorithm = algorithm
        self._key = key
        self._prepared: Any = None
        self.prepared_count = 0  # how often the configured key was prepared (tests)

    def prepare_key(self, key: Any) -> Any:
        if key is not self._key:
            return self._algorithm.prepare_key(key)
        if self._prepared is None:
            self._prepared = self._algorithm.prepare_key(key)
            self.prepared_count += 1
        return self._prepared

    def check_key_length(self, key: Any) -> str | None:
        return self._algorithm.check_key_length(key)

    def sign(self, msg: bytes, key: Any) -> bytes:
        return self._algorithm.sign(msg, key)

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        return self._algorithm.verify(msg, key, sig)

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        raise NotImplementedError("verification only")

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        raise NotImplementedError("verification only")


#: A base64url segment without padding: PyJWT's alphabet check, as one regular expression.
_SEGMENT: Final = re.compile(rb"[A-Za-z0-9_-]*")


class _FastSegments(jwt.PyJWS):
    """PyJWS with its segment decoding done at C speed, with the same checks.

    PyJWT 2.15 checks each character of each segment against the base64url alphabet in a Python
    generator: ~290 steps per token, and the header is decoded twice (``get_unverified_header``,
    then ``decode``); ~40 % of a verification. Same rules here (at most two ``=``, then only on a
    multiple of 4; no other character outside the alphabet; the canonical encoding only), checked
    against PyJWT's own on generated segments (tests/contract/test_tokens.py).
    """

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if padding > 2 or (padding and len(segment) % 4 != 0):
            raise jwt.DecodeError(f"Invalid {name} padding")
        if len(stripped) % 4 == 1 or _SEGMENT.fullmatch(stripped) is None:
            raise jwt.DecodeError(f"Invalid {name} padding")
        try:
            decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
        except (TypeError, binascii.Error) as err:
            raise jwt.DecodeError(f"Invalid {name} padding") from err
        if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
            raise jwt.DecodeError(f"Invalid {name} padding")
        return decoded


def _with_prepared_keys(
    algorithms: list[str], key_for: Callable[[str], Any]
) -> tuple[jwt.PyJWT, jwt.PyJWS]:
    """A PyJWT of its own whose algorithms prepare our key once (:class:`_PreparedKey`) and whose
    segments are decoded by :class:`_FastSegments`.

    PyJWT has no public way to give ``PyJWT.decode`` another ``PyJWS``; its ``_jws`` attribute is
    the seam, checked here: without it (a future PyJWT), tokens are verified as before, only slower.
    """
    decoder = jwt.PyJWT()
    stock = getattr(decoder, "_jws", None)
    if not isinstance(stock, jwt.PyJWS) or not hasattr(stock, "_decode_base64url_segment"):
        return decoder, jwt.PyJWS()
    jws = _FastSegments(options=stock.options)
    decoder._jws = jws
    for alg in algorithms:
        try:
            original = jws.get_algorithm_by_name(alg)
        except NotImplementedError:
            continue  # not available here (no cryptography): PyJWT refuses it as before
        jws.unregister_algorithm(alg)
        jws.register_algorithm(alg, _PreparedKey(original, key_for(alg)))
    return decoder, jws


class TokenVerifier:
    def __init__(self, settings: JwtConfig) -> None:
        settings.require_jwt_key()
        self._algorithms = list(settings.jwt_algorithms)
        self._secret = settings.jwt_secret
        self._public_key = settings.jwt_public_key
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds
        self._decoder, self._jws = _with_prepared_keys(self._algorithms, self._key_for)

    def _key_for(self, alg: str) -> Any:
        if alg.startswith("HS"):
            return self._secret
        return self._public_key

    def verify(self, token: str) -> Principal:
        try:
            header = self._jws.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm")
        options: jwt.types.Options = {"require": ["exp", "sub"]}
        try:
            claims = self._decoder.decode(
                token,
                key=self._key_for(alg),
                algorithms=[alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("expired") from None
        except jwt.ImmatureSignatureError:
            # A clock-skew problem between issuer and relay; "malformed" would hide it.
            raise InvalidToken("not-yet-valid") from None
        except InvalidSubjectError:
            # PyJWT >= 2.10 rejects a non-string sub itself; same failure as "sub not an id".
            raise InvalidToken("subject") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad-signature") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("audience") from None
        except jwt.MissingRequiredClaimError as exc:
            # PyJWT requires iss/aud itself once they are configured; say which check failed.
            raise InvalidToken(_MISSING_CLAIM.get(exc.claim, "claims")) from None
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
            # InvalidKeyError is not an InvalidTokenError: an RS256 token against an EC key (with
            # both algorithms listed) escaped as a 500. The token's algorithm does not fit our key.
            raise InvalidToken("algorithm") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise InvalidToken("malformed") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_valid_id(sub):
            raise InvalidToken("subject")
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise InvalidToken("claims")
        return Principal(user_id=sub, expires_at=float(exp))


def mint_token(
    user_id: str,
    *,
    key: str,
    algorithm: str = "HS256",
    ttl_seconds: float = 3600,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a token for ``user_id`` (development, tests, load tests)."""
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl_seconds)}
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    if extra:
        claims.update(extra)
    return jwt.encode(claims, key, algorithm=algorithm)


def mint_for_settings(user_id: str, settings: JwtConfig, ttl_seconds: float = 3600) -> str:
    """A token the relay configured by ``settings`` will accept (needs ``JWT_SECRET`` and HS*)."""
    alg = next((a for a in settings.jwt_algorithms if a.startswith("HS")), None)
    if alg is None or settings.jwt_secret is None:
        raise ValueError("minting needs JWT_SECRET and an HS* algorithm in JWT_ALGORITHMS")
    return mint_token(
        user_id,
        key=settings.jwt_secret,
        algorithm=alg,
        ttl_seconds=ttl_seconds,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
