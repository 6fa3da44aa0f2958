"""Settings of PROTOCOL §2, read once from the environment into a frozen object (CONVENTIONS §4).

Each process reads what it uses: :class:`RelayConfig` (Redis, JWT, listening address, limits,
SSE), :class:`WorkerConfig` (Redis, session lifetime; no secret); the CLI reads single groups. Both
are built from small groups (:class:`RedisConfig`, :class:`JwtConfig`, :class:`ListenConfig`,
:class:`SessionConfig`, :class:`ReplicaWaitConfig`), so each variable is parsed in one place and keeps one attribute name
everywhere. ("Config", not "Settings": the worker's ``WorkerSettings`` and ``RedisSettings`` are
arq's.) Build one in an entrypoint with ``from_env`` and pass it down; nothing reads the
environment at import time. A missing or invalid value raises :class:`ConfigError` naming the
variable, so a process fails at start-up with a message an operator can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Self, TypeVar

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

T = TypeVar("T")

#: Algorithms the relay knows how to verify. ``none`` is never accepted (PROTOCOL §2).
SUPPORTED_ALGORITHMS: Final = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}
)
_HMAC = frozenset({"HS256", "HS384", "HS512"})
#: RFC 7518 §3.2: an HMAC key MUST be at least as long as the hash output.
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}


class ConfigError(ValueError):
    """A configuration variable is missing or invalid; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
    return value


#: ``RELAY_WORKERS`` at most (a typo such as 1000 should not fork a thousand relays).
MAX_RELAY_WORKERS: Final = 64


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parse_relay_workers(env: Mapping[str, str], name: str) -> int:
    """``auto``: one per usable CPU; else an integer 1..:data:`MAX_RELAY_WORKERS`."""
    raw = env.get(name, "").strip()
    if raw.lower() == "auto":
        return min(MAX_RELAY_WORKERS, usable_cpus())
    return _int(env, name, 1, 1, MAX_RELAY_WORKERS)


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip()
    return raw or default


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


def _csv(env: Mapping[str, str], name: str, default: str = "") -> tuple[str, ...]:
    # Set-but-blank means "use the default", as for every other variable here.
    raw = env.get(name, "").strip() or default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(name, f"expected 0 or 1, got {raw!r}")


def _public_key(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if raw.startswith("-----BEGIN"):
        pem = raw.replace("\\n", "\n")  # one-line env files write the newlines as \n
        _check_public_key(name, pem)
        return pem
    path = Path(raw)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, f"not a PEM and not a readable file: {exc.strerror}") from None
    if "-----BEGIN" not in text:
        raise ConfigError(name, f"file {raw} holds no PEM key")
    _check_public_key(name, text)
    return text


def _check_public_key(name: str, pem: str) -> None:
    """Parse the key now: a bad key must stop the relay at start-up, not 401 every token later."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        hint = " (it holds a private key; give the public one)" if "PRIVATE KEY" in pem else ""
        raise ConfigError(name, f"not a valid PEM public key{hint}") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError(name, f"unsupported public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(name, f"an RSA or EC key is needed, got {type(key).__name__}")


def _redis_url(env: Mapping[str, str], name: str) -> str:
    url = _str(env, name, "redis://127.0.0.1:6379/0")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, "must start with redis://, rediss:// or unix://")
    return url


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


# --- the groups: each variable is parsed in exactly one of these -----------------------------------


def _redis_fields(e: Mapping[str, str]) -> dict[str, Any]:
    url = _redis_url(e, "REDIS_URL")
    cluster = _flag(e, "REDIS_CLUSTER")
    queue = _redis_url(e, "QUEUE_REDIS_URL") if _opt(e, "QUEUE_REDIS_URL") else None
    if cluster:
        # PROTOCOL §9: arq runs MULTI/WATCH over keys of many slots, which a cluster refuses.
        if url.startswith("unix://"):
            raise ConfigError("REDIS_URL", "a cluster node is named by redis:// or rediss://")
        if queue is None:
            raise ConfigError(
                "QUEUE_REDIS_URL",
                "required with REDIS_CLUSTER=1: the arq queue needs a standalone Redis of its own",
            )
        if queue == url:
            raise ConfigError(
                "QUEUE_REDIS_URL",
                "must name a standalone Redis, not the cluster node REDIS_URL names",
            )
    return {"redis_url": url, "redis_cluster": cluster, "queue_redis_url": queue or url}


def _wait_fields(e: Mapping[str, str]) -> dict[str, Any]:
    return {
        "redis_wait_replicas": _int(e, "REDIS_WAIT_REPLICAS", 0, 0, 16),
        "redis_wait_timeout_ms": _int(e, "REDIS_WAIT_TIMEOUT_MS", 200, 1, 60_000),
    }


def _jwt_fields(e: Mapping[str, str]) -> dict[str, Any]:
    algorithms = _csv(e, "JWT_ALGORITHMS", "HS256")
    if not algorithms:
        raise ConfigError("JWT_ALGORITHMS", "must list at least one algorithm")
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigError("JWT_ALGORITHMS", "'none' is never accepted")
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                "JWT_ALGORITHMS",
                f"unsupported algorithm {alg!r} (use {', '.join(sorted(SUPPORTED_ALGORITHMS))})",
            )
    secret = _opt(e, "JWT_SECRET")
    needed = max((_HMAC_MIN_BYTES[alg] for alg in algorithms if alg in _HMAC), default=0)
    if secret is not None and len(secret.encode()) < needed:
        # PyJWT would only warn, on every token; a short secret is a config error (never shown).
        raise ConfigError(
            "JWT_SECRET",
            f"must be at least {needed} bytes for {', '.join(a for a in algorithms if a in _HMAC)}"
            f" (RFC 7518 §3.2), got {len(secret.encode())}",
        )
    cookie = _str(e, "JWT_COOKIE_NAME", "access_token")
    # RFC 6265 token, kept to the safe subset; str.isalnum alone accepts non-ASCII letters.
    if not (cookie.isascii() and cookie.replace("_", "").replace("-", "").isalnum()):
        raise ConfigError("JWT_COOKIE_NAME", f"not a valid cookie name: {cookie!r}")
    return {
        "jwt_secret": secret,
        "jwt_public_key": _public_key(e, "JWT_PUBLIC_KEY"),
        "jwt_algorithms": algorithms,
        "jwt_issuer": _opt(e, "JWT_ISSUER"),
        "jwt_audience": _opt(e, "JWT_AUDIENCE"),
        "jwt_cookie_name": cookie,
        "jwt_leeway_seconds": _int(e, "JWT_LEEWAY_SECONDS", 0, 0, 3600),
    }


def _listen_fields(e: Mapping[str, str]) -> dict[str, Any]:
    return {
        "relay_host": _str(e, "RELAY_HOST", "127.0.0.1"),
        "relay_port": _int(e, "RELAY_PORT", 8080, 0, 65535),
    }


def _session_fields(e: Mapping[str, str]) -> dict[str, Any]:
    return {
        "session_ttl_seconds": _int(e, "SESSION_TTL_SECONDS", 86_400, 1, 10 * 365 * 86_400),
        "session_log_maxlen": _int(e, "SESSION_LOG_MAXLEN", 1000, 1, 10_000_000),
    }


def _relay_fields(e: Mapping[str, str]) -> dict[str, Any]:
    return {
        "relay_cors_origins": _csv(e, "RELAY_CORS_ORIGINS"),
        "relay_max_connections": _int(e, "RELAY_MAX_CONNECTIONS", 10_000, 1, 1_000_000),
        "relay_max_connections_per_user": _int(
            e, "RELAY_MAX_CONNECTIONS_PER_USER", 32, 1, 1_000_000
        ),
        "relay_request_head_timeout_seconds": _int(
            e, "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS", 5, 1, 300
        ),
        "relay_max_pending_connections": _int(
            e, "RELAY_MAX_PENDING_CONNECTIONS", 5000, 1, 1_000_000
        ),
        "relay_max_sessions_per_stream": _int(e, "RELAY_MAX_SESSIONS_PER_STREAM", 32, 1, 1000),
        "sse_heartbeat_seconds": _int(e, "SSE_HEARTBEAT_SECONDS", 15, 1, 3600),
        "sse_retry_ms": _int(e, "SSE_RETRY_MS", 2000, 0, 3_600_000),
        "sse_buffer_events": _int(e, "SSE_BUFFER_EVENTS", 1000, 1, 1_000_000),
        "relay_demo": _flag(e, "RELAY_DEMO"),
        "relay_workers": parse_relay_workers(e, "RELAY_WORKERS"),
    }


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class RedisConfig:
    """``REDIS_URL``, ``REDIS_CLUSTER``, ``QUEUE_REDIS_URL``: every process (the enqueue commands
    of the CLI read this alone). ``queue_redis_url`` is ``redis_url`` unless set; with
    ``REDIS_CLUSTER=1`` it must be set, to another (standalone) Redis (PROTOCOL §9)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    queue_redis_url: str = ""  # "": redis_url's, filled in by __attrs_post_init__

    def __attrs_post_init__(self) -> None:
        # Not an attrs Factory(takes_self=True): Litestar's signature models (msgspec) inspect
        # RelayConfig and refuse such defaults.
        if not self.queue_redis_url:
            object.__setattr__(self, "queue_redis_url", self.redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return cls(**_redis_fields(_environ(env)))


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class JwtConfig:
    """``JWT_*``: verifying tokens (the relay) and minting development ones (``rapidphoto token``)."""

    jwt_secret: str | None = attrs.field(default=None, repr=False)
    jwt_public_key: str | None = attrs.field(default=None, repr=False)
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_cookie_name: str = "access_token"
    jwt_leeway_seconds: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return cls(**_jwt_fields(_environ(env)))

    def require_jwt_key(self) -> None:
        """The relay cannot verify anything without a key: fail at start-up, naming the variable."""
        uses_hmac = any(alg in _HMAC for alg in self.jwt_algorithms)
        uses_public = any(alg not in _HMAC for alg in self.jwt_algorithms)
        if self.jwt_secret is None and self.jwt_public_key is None:
            raise ConfigError(
                "JWT_SECRET", "set JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256/ES256)"
            )
        if uses_hmac and self.jwt_secret is None:
            raise ConfigError("JWT_SECRET", "required by the HS* algorithms in JWT_ALGORITHMS")
        if uses_public and self.jwt_public_key is None:
            raise ConfigError(
                "JWT_PUBLIC_KEY", "required by the RS*/ES* algorithms in JWT_ALGORITHMS"
            )


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class ListenConfig:
    """``RELAY_HOST``/``RELAY_PORT``: where the relay listens (and where the CLI says to look)."""

    relay_host: str = "127.0.0.1"
    relay_port: int = 8080

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return cls(**_listen_fields(_environ(env)))


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class SessionConfig:
    """``SESSION_*``: how long a session lives and how much of its log is kept (the worker)."""

    session_ttl_seconds: int = 86_400
    session_log_maxlen: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return cls(**_session_fields(_environ(env)))


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class ReplicaWaitConfig:
    """``REDIS_WAIT_*``: the worker reports a job done only once this many replicas hold its write
    (``WAIT`` after each command, PROTOCOL §9); 0 waits for none."""

    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 200

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        return cls(**_wait_fields(_environ(env)))


# --- what each process reads ----------------------------------------------------------------------


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class RelayConfig(RedisConfig, JwtConfig, ListenConfig):
    """The relay: Redis, JWT, where to listen, its limits and SSE timing.

    Made of several groups; Python refuses a class two slotted bases, hence ``slots=False`` on all.
    """

    relay_cors_origins: tuple[str, ...] = ()
    relay_max_connections: int = 10_000
    relay_max_connections_per_user: int = 32
    relay_request_head_timeout_seconds: int = 5
    relay_max_pending_connections: int = 5000
    #: Sessions one multi-session stream may carry (PROTOCOL §5.1).
    relay_max_sessions_per_stream: int = 32
    sse_heartbeat_seconds: int = 15
    sse_retry_ms: int = 2000
    sse_buffer_events: int = 1000
    relay_demo: bool = False
    #: Processes serving the one port (``rapidphoto-relay --workers``); limits are per process.
    relay_workers: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        e = _environ(env)
        return cls(**_redis_fields(e), **_jwt_fields(e), **_listen_fields(e), **_relay_fields(e))


@attrs.frozen(kw_only=True, slots=False)  # no slots: see RelayConfig
class WorkerConfig(RedisConfig, SessionConfig, ReplicaWaitConfig):
    """The worker: Redis, the sessions' lifetime, the replicas to wait for; no secret (it never
    sees a token)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        e = _environ(env)
        return cls(**_redis_fields(e), **_session_fields(e), **_wait_fields(e))


def env_value(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    """Parse one extra variable (for process-specific knobs), naming it on error."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None
