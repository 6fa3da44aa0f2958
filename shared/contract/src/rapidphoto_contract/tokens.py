"""JWT helpers with pinned algorithms (PROTOCOL §5), built on PyJWT.

:class:`TokenVerifier` is what the relay uses: it only accepts the algorithms listed in the
settings, requires ``exp`` and ``sub``, checks ``iss``/``aud`` when configured and reports *why* a
token failed as a short, token-free reason (for metrics and error bodies). :func:`mint_token` is for
development, tests and load tests.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal, TypeAlias

import attrs
import jwt
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


class TokenVerifier:
    def __init__(self, settings: JwtConfig) -> None:
        settings.require_jwt_key()
        self._algorithms = list(settings.jwt_algorithms)
        self._secret = settings.jwt_secret
        self._public_key = settings.jwt_public_key
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds

    def _key_for(self, alg: str) -> Any:
        if alg.startswith("HS"):
            return self._secret
        return self._public_key

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm")
        options: jwt.types.Options = {"require": ["exp", "sub"]}
        try:
            claims = jwt.decode(
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
