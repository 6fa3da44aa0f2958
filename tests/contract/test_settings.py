"""RelayConfig of PROTOCOL §2: defaults, parsing of every variable, errors naming the variable, and
which process reads which (RelayConfig, WorkerConfig and the groups they are built from)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from rapidphoto_contract.settings import (
    ConfigError,
    JwtConfig,
    ListenConfig,
    RedisConfig,
    RelayConfig,
    SessionConfig,
    WorkerConfig,
    env_value,
    usable_cpus,
)
from tests.support.keypairs import KeyPair

SECRET = "s3cr3t-value-that-must-never-be-printed"


def test_defaults_match_the_spec_table() -> None:
    s = RelayConfig.from_env({})
    assert s == RelayConfig()
    worker = WorkerConfig.from_env({})
    assert worker == WorkerConfig()
    assert attrs.asdict(s) | attrs.asdict(worker) == {
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_cluster": False,
        "queue_redis_url": "redis://127.0.0.1:6379/0",
        "redis_wait_replicas": 0,
        "redis_wait_timeout_ms": 200,
        "jwt_secret": None,
        "jwt_public_key": None,
        "jwt_algorithms": ("HS256",),
        "jwt_issuer": None,
        "jwt_audience": None,
        "jwt_cookie_name": "access_token",
        "jwt_leeway_seconds": 0,
        "relay_host": "127.0.0.1",
        "relay_port": 8080,
        "relay_cors_origins": (),
        "relay_max_connections": 10_000,
        "relay_max_connections_per_user": 32,
        "relay_request_head_timeout_seconds": 5,
        "relay_max_pending_connections": 5000,
        "relay_max_sessions_per_stream": 32,
        "sse_heartbeat_seconds": 15,
        "sse_retry_ms": 2000,
        "sse_buffer_events": 1000,
        "relay_demo": False,
        "relay_workers": 1,
        "session_ttl_seconds": 86_400,
        "session_log_maxlen": 1000,
    }


def test_blank_values_mean_the_default() -> None:
    """``FOO=`` in an env file is the same as not setting ``FOO``."""
    blank = dict.fromkeys(
        (
            "REDIS_URL",
            "REDIS_CLUSTER",
            "QUEUE_REDIS_URL",
            "REDIS_WAIT_REPLICAS",
            "REDIS_WAIT_TIMEOUT_MS",
            "JWT_SECRET",
            "JWT_PUBLIC_KEY",
            "JWT_ISSUER",
            "JWT_AUDIENCE",
            "JWT_COOKIE_NAME",
            "JWT_LEEWAY_SECONDS",
            "RELAY_HOST",
            "RELAY_PORT",
            "RELAY_CORS_ORIGINS",
            "RELAY_MAX_CONNECTIONS",
            "RELAY_MAX_CONNECTIONS_PER_USER",
            "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS",
            "RELAY_MAX_PENDING_CONNECTIONS",
            "RELAY_MAX_SESSIONS_PER_STREAM",
            "SSE_HEARTBEAT_SECONDS",
            "SSE_RETRY_MS",
            "SSE_BUFFER_EVENTS",
            "RELAY_DEMO",
            "SESSION_TTL_SECONDS",
            "SESSION_LOG_MAXLEN",
        ),
        "  ",
    )
    assert RelayConfig.from_env(blank) == RelayConfig()
    assert WorkerConfig.from_env(blank) == WorkerConfig()


def test_blank_jwt_algorithms_means_hs256() -> None:
    """Regression: a set-but-empty ``JWT_ALGORITHMS`` failed start-up ("must list at least one
    algorithm") while every other blank variable meant its default."""
    assert RelayConfig.from_env({"JWT_ALGORITHMS": ""}).jwt_algorithms == ("HS256",)
    assert RelayConfig.from_env({"JWT_ALGORITHMS": "  "}).jwt_algorithms == ("HS256",)


def test_every_variable_is_parsed(rsa_keys: KeyPair) -> None:
    env = {
        "REDIS_URL": "rediss://user:pw@redis.internal:6380/3",
        "JWT_SECRET": SECRET,
        "JWT_PUBLIC_KEY": rsa_keys.public_pem,
        "JWT_ALGORITHMS": " HS256 , RS256,ES256 ",
        "JWT_ISSUER": "https://auth.rapidphoto.example",
        "JWT_AUDIENCE": "rapidphoto-relay",
        "JWT_COOKIE_NAME": "rp_session-token",
        "JWT_LEEWAY_SECONDS": "30",
        "RELAY_HOST": "0.0.0.0",
        "RELAY_PORT": "9090",
        "RELAY_CORS_ORIGINS": "https://app.example, http://localhost:3000,",
        "RELAY_MAX_CONNECTIONS": "5000",
        "RELAY_MAX_CONNECTIONS_PER_USER": "4",
        "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS": "3",
        "RELAY_MAX_PENDING_CONNECTIONS": "700",
        "RELAY_MAX_SESSIONS_PER_STREAM": "8",
        "SSE_HEARTBEAT_SECONDS": "30",
        "SSE_RETRY_MS": "500",
        "SSE_BUFFER_EVENTS": "64",
        "RELAY_DEMO": "1",
        "SESSION_TTL_SECONDS": "3600",
        "SESSION_LOG_MAXLEN": "200",
        "REDIS_CLUSTER": "1",
        "QUEUE_REDIS_URL": "redis://queue.internal:6379/0",
        "REDIS_WAIT_REPLICAS": "1",
        "REDIS_WAIT_TIMEOUT_MS": "500",
    }
    assert WorkerConfig.from_env(env) == WorkerConfig(
        redis_url="rediss://user:pw@redis.internal:6380/3",
        redis_cluster=True,
        queue_redis_url="redis://queue.internal:6379/0",
        redis_wait_replicas=1,
        redis_wait_timeout_ms=500,
        session_ttl_seconds=3600,
        session_log_maxlen=200,
    )
    s = RelayConfig.from_env(env)
    assert s == RelayConfig(
        redis_url="rediss://user:pw@redis.internal:6380/3",
        redis_cluster=True,
        queue_redis_url="redis://queue.internal:6379/0",
        jwt_secret=SECRET,
        jwt_public_key=rsa_keys.public_pem.strip(),
        jwt_algorithms=("HS256", "RS256", "ES256"),
        jwt_issuer="https://auth.rapidphoto.example",
        jwt_audience="rapidphoto-relay",
        jwt_cookie_name="rp_session-token",
        jwt_leeway_seconds=30,
        relay_host="0.0.0.0",
        relay_port=9090,
        relay_cors_origins=("https://app.example", "http://localhost:3000"),
        relay_max_connections=5000,
        relay_max_connections_per_user=4,
        relay_request_head_timeout_seconds=3,
        relay_max_pending_connections=700,
        relay_max_sessions_per_stream=8,
        sse_heartbeat_seconds=30,
        sse_retry_ms=500,
        sse_buffer_events=64,
        relay_demo=True,
    )


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_PORT", "8181")
    monkeypatch.delenv("REDIS_URL", raising=False)
    s = RelayConfig.from_env()
    assert s.relay_port == 8181
    assert s.redis_url == "redis://127.0.0.1:6379/0"


def test_settings_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        RelayConfig().relay_port = 1  # type: ignore[misc]


def reader_of(name: str) -> type[RelayConfig | WorkerConfig]:
    """The process that reads ``name``: the worker the SESSION_* and REDIS_WAIT_* ones, the relay
    the rest."""
    return WorkerConfig if name.startswith(("SESSION_", "REDIS_WAIT_")) else RelayConfig


INT_VARS = [
    # name, lowest accepted, highest accepted
    ("JWT_LEEWAY_SECONDS", 0, 3600),
    ("RELAY_PORT", 0, 65535),
    ("RELAY_MAX_CONNECTIONS", 1, 1_000_000),
    ("RELAY_MAX_CONNECTIONS_PER_USER", 1, 1_000_000),
    ("RELAY_REQUEST_HEAD_TIMEOUT_SECONDS", 1, 300),
    ("RELAY_MAX_PENDING_CONNECTIONS", 1, 1_000_000),
    ("RELAY_MAX_SESSIONS_PER_STREAM", 1, 1000),
    ("SSE_HEARTBEAT_SECONDS", 1, 3600),
    ("SSE_RETRY_MS", 0, 3_600_000),
    ("SSE_BUFFER_EVENTS", 1, 1_000_000),
    ("RELAY_WORKERS", 1, 64),
    ("SESSION_TTL_SECONDS", 1, 10 * 365 * 86_400),
    ("SESSION_LOG_MAXLEN", 1, 10_000_000),
    ("REDIS_WAIT_REPLICAS", 0, 16),
    ("REDIS_WAIT_TIMEOUT_MS", 1, 60_000),
]


@pytest.mark.parametrize(("name", "lo", "hi"), INT_VARS)
def test_int_bounds_are_accepted(name: str, lo: int, hi: int) -> None:
    field = name.lower()
    assert getattr(reader_of(name).from_env({name: str(lo)}), field) == lo
    assert getattr(reader_of(name).from_env({name: f" {hi} "}), field) == hi


@pytest.mark.parametrize(("name", "lo", "hi"), INT_VARS)
@pytest.mark.parametrize("bad", ["abc", "1.5", "0x10", "1e3", "ten"])
def test_bad_ints_name_the_variable(name: str, lo: int, hi: int, bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: expected an integer, got '{bad}'") as info:
        reader_of(name).from_env({name: bad})
    assert info.value.variable == name


@pytest.mark.parametrize(("name", "lo", "hi"), INT_VARS)
def test_out_of_range_ints_name_the_variable(name: str, lo: int, hi: int) -> None:
    for value in (lo - 1, hi + 1):
        with pytest.raises(ConfigError, match=rf"^{name}: must be between {lo} and {hi}") as info:
            reader_of(name).from_env({name: str(value)})
        assert info.value.variable == name


@pytest.mark.parametrize("value", ["none", "None", "NONE", "HS256,none", " none "])
def test_jwt_algorithms_never_accept_none(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^JWT_ALGORITHMS: 'none' is never accepted"):
        RelayConfig.from_env({"JWT_ALGORITHMS": value})


@pytest.mark.parametrize("value", ["HS1", "hs256", "PS256", "EdDSA", "RS256,XYZ"])
def test_jwt_algorithms_reject_unknown(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^JWT_ALGORITHMS: unsupported algorithm") as info:
        RelayConfig.from_env({"JWT_ALGORITHMS": value})
    assert info.value.variable == "JWT_ALGORITHMS"


def test_jwt_algorithms_of_only_commas_fail() -> None:
    with pytest.raises(ConfigError, match=r"^JWT_ALGORITHMS: must list at least one"):
        RelayConfig.from_env({"JWT_ALGORITHMS": " , ,"})


@pytest.mark.parametrize(
    "url",
    ["redis://localhost", "redis://:pw@h:1/2", "rediss://h:6380/0", "unix:///tmp/redis.sock"],
)
def test_redis_url_schemes_accepted(url: str) -> None:
    assert RelayConfig.from_env({"REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "tcp://h:1", "REDIS"])
def test_redis_url_bad_scheme_names_the_variable(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL: must start with redis://") as info:
        RelayConfig.from_env({"REDIS_URL": url})
    assert info.value.variable == "REDIS_URL"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("true", True), ("YES", True), ("on", True)],
        *[("0", False), ("false", False), ("no", False), ("Off", False)],
    ],
)
def test_relay_demo_flag(raw: str, value: bool) -> None:
    assert RelayConfig.from_env({"RELAY_DEMO": raw}).relay_demo is value


@pytest.mark.parametrize("raw", ["2", "maybe", "y", "enabled", "-1"])
def test_relay_demo_garbage_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^RELAY_DEMO: expected 0 or 1") as info:
        RelayConfig.from_env({"RELAY_DEMO": raw})
    assert info.value.variable == "RELAY_DEMO"


@pytest.mark.parametrize("name", ["a b", "a;b", "a=b", "tok,en", "cookié"])
def test_bad_cookie_names(name: str) -> None:
    """``cookié`` is a regression: ``str.isalnum`` alone let non-ASCII letters through, and a
    cookie name must be an RFC 6265 token (ASCII)."""
    with pytest.raises(ConfigError, match=r"^JWT_COOKIE_NAME: not a valid cookie name"):
        RelayConfig.from_env({"JWT_COOKIE_NAME": name})


# --- JWT_PUBLIC_KEY ------------------------------------------------------------------------------


def test_public_key_inline(rsa_keys: KeyPair) -> None:
    s = RelayConfig.from_env({"JWT_PUBLIC_KEY": rsa_keys.public_pem, "JWT_ALGORITHMS": "RS256"})
    assert s.jwt_public_key == rsa_keys.public_pem.strip()


def test_public_key_inline_with_escaped_newlines(ec_keys: KeyPair) -> None:
    """One-line env files (docker ``--env-file``) write the PEM's newlines as ``\\n``."""
    one_line = ec_keys.public_pem.strip().replace("\n", "\\n")
    assert "\n" not in one_line
    s = RelayConfig.from_env({"JWT_PUBLIC_KEY": one_line})
    assert s.jwt_public_key == ec_keys.public_pem.strip()


def test_public_key_from_a_file(tmp_path: Path, rsa_keys: KeyPair) -> None:
    path = tmp_path / "relay.pub.pem"
    path.write_text(rsa_keys.public_pem)
    s = RelayConfig.from_env({"JWT_PUBLIC_KEY": str(path)})
    assert s.jwt_public_key == rsa_keys.public_pem


def test_public_key_path_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        ConfigError, match=r"^JWT_PUBLIC_KEY: not a PEM and not a readable file"
    ) as info:
        RelayConfig.from_env({"JWT_PUBLIC_KEY": str(missing)})
    assert info.value.variable == "JWT_PUBLIC_KEY"


def test_public_key_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: not a PEM and not a readable file"):
        RelayConfig.from_env({"JWT_PUBLIC_KEY": str(tmp_path)})


def test_public_key_file_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.txt"
    path.write_text("just some text\n")
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: file .* holds no PEM key"):
        RelayConfig.from_env({"JWT_PUBLIC_KEY": str(path)})


def test_public_key_garbage_pem_fails_at_start_up(tmp_path: Path) -> None:
    """Regression: any text containing ``-----BEGIN`` was accepted, so a broken key let the relay
    start and then answer every token with 401 "malformed"; now start-up fails, naming the variable."""
    garbage = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: not a valid PEM public key"):
        RelayConfig.from_env({"JWT_PUBLIC_KEY": garbage})
    path = tmp_path / "garbage.pem"
    path.write_text(garbage)
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: not a valid PEM public key"):
        RelayConfig.from_env({"JWT_PUBLIC_KEY": str(path)})


def test_public_key_that_is_a_private_key(rsa_keys: KeyPair) -> None:
    with pytest.raises(ConfigError, match="it holds a private key") as info:
        RelayConfig.from_env({"JWT_PUBLIC_KEY": rsa_keys.private_pem})
    assert "BEGIN" not in str(info.value)  # the key is not echoed
    assert rsa_keys.private_pem.splitlines()[1] not in str(info.value)


def test_public_key_of_an_unsupported_type(ed25519_keys: KeyPair) -> None:
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: an RSA or EC key is needed"):
        RelayConfig.from_env({"JWT_PUBLIC_KEY": ed25519_keys.public_pem})


# --- require_jwt_key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "needed"), [("HS256", 32), ("HS384", 48), ("HS512", 64), ("HS256,HS512", 64)]
)
def test_short_jwt_secret_is_refused(algorithms: str, needed: int) -> None:
    """RFC 7518 §3.2 makes the key length a MUST; PyJWT only warns, once per token verified."""
    short = "k" * (needed - 1)
    with pytest.raises(ConfigError, match=rf"^JWT_SECRET: must be at least {needed} bytes") as info:
        RelayConfig.from_env({"JWT_SECRET": short, "JWT_ALGORITHMS": algorithms})
    assert short not in str(info.value)
    ok = RelayConfig.from_env({"JWT_SECRET": "k" * needed, "JWT_ALGORITHMS": algorithms})
    assert ok.jwt_secret == "k" * needed


def test_short_jwt_secret_unused_without_hs(ec_keys: KeyPair) -> None:
    s = RelayConfig.from_env(
        {"JWT_SECRET": "short", "JWT_PUBLIC_KEY": ec_keys.public_pem, "JWT_ALGORITHMS": "ES256"}
    )
    assert s.jwt_secret == "short"


def test_require_jwt_key_without_any_key() -> None:
    with pytest.raises(ConfigError, match=r"^JWT_SECRET: set JWT_SECRET .* or JWT_PUBLIC_KEY"):
        RelayConfig.from_env({}).require_jwt_key()


def test_require_jwt_key_hs_without_secret(rsa_keys: KeyPair) -> None:
    s = RelayConfig.from_env(
        {"JWT_PUBLIC_KEY": rsa_keys.public_pem, "JWT_ALGORITHMS": "HS256,RS256"}
    )
    with pytest.raises(ConfigError, match=r"^JWT_SECRET: required by the HS"):
        s.require_jwt_key()


def test_require_jwt_key_rs_without_public_key() -> None:
    s = RelayConfig.from_env({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "RS256"})
    with pytest.raises(ConfigError, match=r"^JWT_PUBLIC_KEY: required by the RS"):
        s.require_jwt_key()


def test_require_jwt_key_satisfied(rsa_keys: KeyPair) -> None:
    RelayConfig.from_env({"JWT_SECRET": SECRET}).require_jwt_key()
    RelayConfig.from_env(
        {"JWT_PUBLIC_KEY": rsa_keys.public_pem, "JWT_ALGORITHMS": "RS256"}
    ).require_jwt_key()
    RelayConfig.from_env(
        {
            "JWT_SECRET": SECRET,
            "JWT_PUBLIC_KEY": rsa_keys.public_pem,
            "JWT_ALGORITHMS": "HS256,RS256",
        }
    ).require_jwt_key()


# --- never show the secret -----------------------------------------------------------------------


def test_repr_never_shows_the_secret_or_key(rsa_keys: KeyPair) -> None:
    s = RelayConfig.from_env({"JWT_SECRET": SECRET, "JWT_PUBLIC_KEY": rsa_keys.public_pem})
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        assert SECRET not in text
        assert "BEGIN PUBLIC KEY" not in text
        assert "jwt_secret" not in text
    assert "relay_port=8080" in repr(s)  # the rest is still shown, for start-up logs


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    err = ConfigError("RELAY_PORT", "bad")
    assert str(err) == "RELAY_PORT: bad"
    assert err.variable == "RELAY_PORT"


# --- env_value -----------------------------------------------------------------------------------


def test_env_value() -> None:
    assert env_value({}, "WORKER_MAX_JOBS", int, 10) == 10
    assert env_value({"WORKER_MAX_JOBS": " "}, "WORKER_MAX_JOBS", int, 10) == 10
    assert env_value({"WORKER_MAX_JOBS": "20"}, "WORKER_MAX_JOBS", int, 10) == 20
    with pytest.raises(ConfigError, match=r"^WORKER_MAX_JOBS: invalid literal") as info:
        env_value({"WORKER_MAX_JOBS": "x"}, "WORKER_MAX_JOBS", int, 10)
    assert info.value.variable == "WORKER_MAX_JOBS"


# --- each process reads what it uses ---------------------------------------------------------------

#: Invalid values for every variable only the relay reads.
BAD_RELAY_ONLY = {
    "JWT_SECRET": "short",
    "JWT_ALGORITHMS": "none",
    "JWT_PUBLIC_KEY": "/nonexistent/key.pem",
    "JWT_COOKIE_NAME": "a b",
    "JWT_LEEWAY_SECONDS": "x",
    "RELAY_HOST": "",
    "RELAY_PORT": "x",
    "RELAY_MAX_CONNECTIONS": "x",
    "RELAY_MAX_CONNECTIONS_PER_USER": "x",
    "RELAY_REQUEST_HEAD_TIMEOUT_SECONDS": "x",
    "RELAY_MAX_PENDING_CONNECTIONS": "x",
    "SSE_HEARTBEAT_SECONDS": "x",
    "SSE_RETRY_MS": "x",
    "SSE_BUFFER_EVENTS": "x",
    "RELAY_DEMO": "maybe",
}


def test_the_worker_reads_no_jwt_and_no_relay_variable() -> None:
    """The worker needs no JWT_SECRET: nothing of the relay's can stop it."""
    worker = WorkerConfig.from_env({**BAD_RELAY_ONLY, "SESSION_TTL_SECONDS": "60"})
    assert worker == WorkerConfig(session_ttl_seconds=60)
    assert not hasattr(worker, "jwt_secret")
    assert not hasattr(worker, "sse_retry_ms")


def test_the_relay_reads_no_session_variable() -> None:
    relay = RelayConfig.from_env({"SESSION_TTL_SECONDS": "x", "SESSION_LOG_MAXLEN": "0"})
    assert relay == RelayConfig()
    assert not hasattr(relay, "session_ttl_seconds")


def test_groups_read_only_their_own_variables() -> None:
    """What the CLI reads: enqueueing needs REDIS_URL alone, minting a token the JWT_* alone."""
    assert RedisConfig.from_env({**BAD_RELAY_ONLY, "REDIS_URL": "unix:///r.sock"}) == RedisConfig(
        redis_url="unix:///r.sock"
    )
    assert JwtConfig.from_env({"REDIS_URL": "http://x", "JWT_SECRET": SECRET}) == JwtConfig(
        jwt_secret=SECRET
    )
    assert ListenConfig.from_env({"REDIS_URL": "http://x", "RELAY_PORT": "1"}).relay_port == 1
    assert SessionConfig.from_env({"REDIS_URL": "http://x"}) == SessionConfig()


def test_a_variable_means_the_same_in_every_group_that_reads_it(rsa_keys: KeyPair) -> None:
    env = {
        "REDIS_URL": "redis://r:1/2",
        "JWT_PUBLIC_KEY": rsa_keys.public_pem,
        "JWT_ALGORITHMS": "RS256",
        "RELAY_PORT": "9",
        "SESSION_LOG_MAXLEN": "5",
    }
    relay, worker = RelayConfig.from_env(env), WorkerConfig.from_env(env)
    for group, whole in (
        (RedisConfig, relay),
        (RedisConfig, worker),
        (JwtConfig, relay),
        (ListenConfig, relay),
        (SessionConfig, worker),
    ):
        part = group.from_env(env)
        assert isinstance(whole, group)
        for field in attrs.fields(group):
            assert getattr(part, field.name) == getattr(whole, field.name), field.name


@pytest.mark.parametrize("raw", ["auto", "AUTO", " auto "])
def test_relay_workers_auto_is_one_per_usable_cpu(raw: str) -> None:
    assert RelayConfig.from_env({"RELAY_WORKERS": raw}).relay_workers == usable_cpus()


def test_the_queue_is_on_redis_url_unless_queue_redis_url_says_otherwise() -> None:
    assert RedisConfig.from_env({"REDIS_URL": "redis://a:1/2"}).queue_redis_url == "redis://a:1/2"
    assert RedisConfig(redis_url="redis://a:1/2").queue_redis_url == "redis://a:1/2"
    standalone = RedisConfig.from_env(
        {"REDIS_URL": "redis://a:1", "QUEUE_REDIS_URL": "redis://q:2"}
    )
    assert (standalone.redis_cluster, standalone.queue_redis_url) == (False, "redis://q:2")
    with pytest.raises(ConfigError, match=r"^QUEUE_REDIS_URL: must start with"):
        RedisConfig.from_env({"QUEUE_REDIS_URL": "http://q"})


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({}, "QUEUE_REDIS_URL", "required with REDIS_CLUSTER=1"),
        ({"QUEUE_REDIS_URL": "redis://n:7000/0"}, "QUEUE_REDIS_URL", "standalone"),
        ({"REDIS_URL": "unix:///r.sock", "QUEUE_REDIS_URL": "redis://q"}, "REDIS_URL", "node"),
        ({"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER", "expected 0 or 1"),
    ],
)
def test_cluster_mode_needs_a_queue_redis_of_its_own(
    env: dict[str, str], variable: str, problem: str
) -> None:
    """PROTOCOL §9: arq has no cluster support, so the queue lives on a standalone Redis."""
    with pytest.raises(ConfigError, match=problem) as info:
        WorkerConfig.from_env({"REDIS_CLUSTER": "1", "REDIS_URL": "redis://n:7000/0", **env})
    assert info.value.variable == variable
