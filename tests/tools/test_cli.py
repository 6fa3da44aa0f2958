"""``rapidphoto``, the people's CLI, run in-process (``main([...])``) against a real Redis.

The enqueue commands are checked by reading arq's keys back, exactly as a worker would see them.
One test runs the installed console script, to prove the entry point is wired.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from rapidphoto_contract import keys
from rapidphoto_contract.jobs import QUEUE_NAME
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_contract.tokens import TokenVerifier
from rapidphoto_tools.cli import main
from rapidphoto_tools.cli_common import redact_url
from rapidphoto_tools.simulation import SimulationSpec, plan_simulation
from tests.conftest import TEST_SECRET
from tests.support.arq_queue import QueuedJob, queued_jobs
from tests.support.redis_server import free_port

START = "start_upload_session"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> str:
    """A clean environment for the CLI: this test's Redis and the suite's secret, nothing else."""
    for name in list(os.environ):
        if name.startswith(("JWT_", "RELAY_", "SSE_", "SESSION_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("JWT_SECRET", TEST_SECRET)
    return redis_url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


def jobs_of(client: redis.Redis) -> list[QueuedJob]:
    return queued_jobs(client)


# --- token ---------------------------------------------------------------------------------------


def test_token_verifies(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    principal = TokenVerifier(RelayConfig.from_env()).verify(token)
    assert principal.user_id == "alice"
    assert principal.expires_at - time.time() == pytest.approx(120, abs=5)


def test_token_default_ttl_is_an_hour(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "bob"]) == 0
    principal = TokenVerifier(RelayConfig.from_env()).verify(capsys.readouterr().out.strip())
    assert principal.expires_at - time.time() == pytest.approx(3600, abs=5)


def test_token_honours_issuer_and_audience(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JWT_ISSUER", "https://auth.example")
    monkeypatch.setenv("JWT_AUDIENCE", "relay")
    assert main(["token", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(RelayConfig.from_env()).verify(token).user_id == "alice"


def test_token_without_jwt_secret(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JWT_SECRET")
    assert main(["token", "alice"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "JWT_SECRET" in captured.err


def test_token_without_an_hs_algorithm(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JWT_ALGORITHMS", "RS256")
    assert main(["token", "alice"]) == 2
    assert "JWT_ALGORITHMS" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["token", "a:b"], ["token", "al ice"], ["token", "u", "--ttl", "0"], ["token"]]
)
def test_token_bad_input(cli_env: str, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err


# --- enqueue commands ----------------------------------------------------------------------------


def test_start(cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "s1", "alice", "12"]) == 0
    job_id = capsys.readouterr().out.strip()
    [job] = jobs_of(r)
    assert job.job_id == job_id
    assert job.data["f"] == START
    assert job.data["a"] == []
    assert job.kwargs == {"session_id": "s1", "user_id": "alice", "total_photos": 12}


def test_complete(cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["complete", "s1", "p-7"]) == 0
    [job] = jobs_of(r)
    assert job.job_id == capsys.readouterr().out.strip()
    assert job.function == "complete_photo_upload"
    assert job.kwargs == {"session_id": "s1", "photo_id": "p-7"}


def test_fail(cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fail", "s1", "p-7", "corrupt file / été"]) == 0
    [job] = jobs_of(r)
    assert job.job_id == capsys.readouterr().out.strip()
    assert job.function == "fail_photo_upload"
    assert job.kwargs == {"session_id": "s1", "photo_id": "p-7", "reason": "corrupt file / été"}
    assert cast(str, r.get(f"arq:job:{job.job_id}")).startswith("{")  # JSON, not pickle


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "s1", "alice", "0"], "total_photos must be between 1 and 10000"),
        (["start", "s1", "alice", "10001"], "total_photos must be between 1 and 10000"),
        (["start", "s1", "alice", "abc"], "invalid int value"),
        (["start", "s1", "alice", "2.5"], "invalid int value"),
        (["start", "notifications", "alice", "3"], "session_id must match"),
        (["start", "a:b", "alice", "3"], "session_id must match"),
        (["start", "s1", "al*ce", "3"], "user_id must match"),
        (["start", "s1", "alice"], "the following arguments are required: total"),
        (["complete", "s1", "p{1}"], "photo_id must match"),
        (["complete", "s 1", "p1"], "session_id must match"),
        (["complete", "s1"], "the following arguments are required: photo_id"),
        (["fail", "s1", "p1", ""], "reason must be a non-empty string"),
        (["fail", "s1", "p1", "   "], "reason must be a non-empty string"),
        (["fail", "s1", "p1", "x" * 1025], "at most 1024 characters"),
        (["fail", "s1", "p1"], "the following arguments are required: reason"),
        (["fail", "s1", "p1", "x", "extra"], "unrecognized arguments: extra"),
        (["explode"], "invalid choice: 'explode'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_exits_2_and_enqueues_nothing(
    cli_env: str,
    r: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert r.dbsize() == 0


def test_bad_configuration_exits_2(
    cli_env: str,
    monkeypatch: pytest.MonkeyPatch,
    r: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", "http://localhost:6379")
    assert main(["complete", "s1", "p1"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err
    assert r.dbsize() == 0


def test_unreachable_redis_exits_1_without_the_password(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert main(["complete", "s1", "p1"]) == 1
    err = capsys.readouterr().err
    assert "Redis at redis://:***@127.0.0.1:" in err
    assert "hunter2" not in err


def test_redact_url() -> None:
    assert redact_url("redis://u:pw@h:1/2") == "redis://u:***@h:1/2"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("token", "start", "complete", "fail", "simulate"):
        assert command in out


# --- simulate ------------------------------------------------------------------------------------

SIM = [
    "simulate",
    "--sessions",
    "3",
    "--photos",
    "20",
    "--rate",
    "2000",
    "--failure-ratio",
    "0.25",
    "--seed",
    "7",
    "--user",
    "alice",
    "--no-wait",
]


def _signature(jobs: list[QueuedJob]) -> list[tuple[str, tuple[tuple[str, object], ...]]]:
    """What a job does, without its random id or enqueue time."""
    return sorted((j.function, tuple(sorted(j.kwargs.items()))) for j in jobs)


def test_simulate_enqueues_the_seeded_plan(
    cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(SIM) == 0
    jobs = jobs_of(r)
    starts = [j for j in jobs if j.function == START]
    photos = [j for j in jobs if j.function != START]
    assert sorted(j.kwargs["session_id"] for j in starts) == ["sim-7-1", "sim-7-2", "sim-7-3"]
    assert {(j.kwargs["user_id"], j.kwargs["total_photos"]) for j in starts} == {("alice", 20)}
    assert len(photos) == 3 * 20
    failed = [j for j in photos if j.function == "fail_photo_upload"]
    assert len(failed) == 12  # pinned for seed 7 (see test_simulation's golden plan)
    for sid in ("sim-7-1", "sim-7-2", "sim-7-3"):
        ids = sorted(j.kwargs["photo_id"] for j in photos if j.kwargs["session_id"] == sid)
        assert ids == sorted(f"photo-{n}" for n in range(1, 21))
    out = capsys.readouterr().out
    for sid in ("sim-7-1", "sim-7-2", "sim-7-3"):
        assert f"session {sid} owner alice" in out  # enough to open a stream
    assert "rapidphoto token alice" in out
    assert "3 start job(s), 60 photo outcome(s) (12 failed)" in out


def test_simulate_same_seed_same_jobs(
    cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(SIM) == 0
    first = _signature(jobs_of(r))
    r.flushdb()
    assert main(SIM) == 0
    assert _signature(jobs_of(r)) == first
    r.flushdb()
    assert main([*SIM, "--seed", "8"]) == 0  # the last --seed wins
    assert _signature(jobs_of(r)) != first


def test_simulate_jobs_match_the_plan(cli_env: str, r: redis.Redis) -> None:
    assert main(SIM) == 0
    plan = plan_simulation(
        SimulationSpec(sessions=3, photos=20, rate=2000, failure_ratio=0.25, seed=7, user="alice")
    )
    photo_jobs = {
        (j.kwargs["session_id"], j.kwargs["photo_id"]): j.kwargs.get("reason")
        for j in jobs_of(r)
        if j.function != START
    }
    assert photo_jobs == {(o.session_id, o.photo_id): o.reason for o in plan.outcomes}


def test_simulate_users_and_duplicates(cli_env: str, r: redis.Redis) -> None:
    argv = [*SIM, "--sessions", "4", "--users", "2", "--duplicates", "1", "--photos", "3"]
    assert main(argv) == 0
    jobs = jobs_of(r)
    owners = sorted(
        (j.kwargs["session_id"], j.kwargs["user_id"]) for j in jobs if j.function == START
    )
    assert owners == [
        ("sim-7-1", "alice-1"),
        ("sim-7-2", "alice-2"),
        ("sim-7-3", "alice-1"),
        ("sim-7-4", "alice-2"),
    ]
    assert len([j for j in jobs if j.function != START]) == 2 * 4 * 3  # every photo twice


def test_simulate_session_prefix_and_start_delay(
    cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``scripts/stack.py`` runs: it opens the demo page on ``demo-<seed>-<n>`` first."""
    argv = [*SIM, "--sessions", "2", "--photos", "3", "--session-prefix", "demo-1"]
    started = time.monotonic()
    assert main([*argv, "--start-delay", "0.3"]) == 0
    assert time.monotonic() - started >= 0.3
    jobs = jobs_of(r)
    assert sorted(j.kwargs["session_id"] for j in jobs if j.function == START) == [
        "demo-1-1",
        "demo-1-2",
    ]
    assert {j.kwargs["session_id"] for j in jobs} == {"demo-1-1", "demo-1-2"}
    starts = max(j.score for j in jobs if j.function == START)
    first_photo = min(j.score for j in jobs if j.function != START)
    assert first_photo - starts >= 250  # ms: the pause sits between the starts and the photos
    assert "2 session(s) started; first photo in 0.3s" in capsys.readouterr().out


def test_simulate_random_seed_is_printed(
    cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--sessions", "1", "--photos", "1", "--rate", "100", "--no-wait"]
    assert main(argv) == 0
    assert "(repeat with --seed " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rate", "0"], "argument --rate"),
        (["--rate", "-3"], "argument --rate"),
        (["--rate", "nan"], "argument --rate"),
        (["--rate", "fast"], "argument --rate: expected a number"),
        (["--failure-ratio", "1.5"], "argument --failure-ratio"),
        (["--failure-ratio", "-0.1"], "argument --failure-ratio"),
        (["--duplicates", "2"], "argument --duplicates"),
        (["--photos", "10001"], "argument --photos"),
        (["--photos", "0"], "argument --photos"),
        (["--sessions", "0"], "argument --sessions"),
        (["--seed", "-1"], "argument --seed"),
        (["--seed", "x"], "argument --seed"),
        (["--users", "4"], "users must be between 1 and the number of sessions"),
        (["--user", "a b"], "--user must match"),
        (["--user", "notifications:x"], "--user must match"),
        (["--timeout", "0"], "argument --timeout"),
        (["--session-prefix", "a:b"], "--session-prefix must match"),
        (["--session-prefix", "x" * 127], "session_id must match"),  # "x...x-1" is 129 long
        (["--start-delay", "-1"], "argument --start-delay"),
    ],
)
def test_simulate_bad_input_exits_2_and_enqueues_nothing(
    cli_env: str,
    r: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main([*SIM, *extra]) == 2
    assert message in capsys.readouterr().err
    assert r.dbsize() == 0


def test_simulate_wait_times_out_without_a_worker(
    cli_env: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*SIM[:-1], "--sessions", "2", "--photos", "2", "--wait", "--timeout", "0.5"]
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "timed out after 0.5s: 2 of 2 session(s) not applied" in err
    assert "sim-7-1: not created; expected uploaded" in err


def test_simulate_wait_returns_when_the_worker_has_applied_everything(
    cli_env: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plays the worker: writes each session's final counts where the worker keeps them."""
    spec = SimulationSpec(sessions=2, photos=5, rate=2000, failure_ratio=0.25, seed=7, user="alice")
    expected = plan_simulation(spec).expected()

    def worker() -> None:
        time.sleep(0.5)
        with redis.Redis.from_url(redis_url) as client:
            for sid, (uploaded, failed) in expected.items():
                client.hset(
                    keys.session_state_key(sid),
                    mapping={keys.STATE_UPLOADED: uploaded, keys.STATE_FAILED: failed},
                )

    thread = threading.Thread(target=worker)
    thread.start()
    argv = [*SIM[:-1], "--sessions", "2", "--photos", "5", "--wait", "--timeout", "10"]
    started = time.monotonic()
    try:
        assert main(argv) == 0
    finally:
        thread.join()
    assert 0.4 < time.monotonic() - started < 5
    out = capsys.readouterr().out
    uploaded = sum(u for u, _ in expected.values())
    failed = sum(f for _, f in expected.values())
    assert f"applied: all 2 session(s) match the plan ({uploaded} uploaded, {failed} failed)" in out


# --- the installed console script ----------------------------------------------------------------


def test_console_script(cli_env: str, r: redis.Redis) -> None:
    script = Path(sys.executable).parent / "rapidphoto"
    env = dict(os.environ)
    done = subprocess.run(
        [str(script), "token", "alice"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert TokenVerifier(RelayConfig.from_env()).verify(done.stdout.strip()).user_id == "alice"

    done = subprocess.run(
        [str(script), "start", "s1", "alice", "0"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "total_photos" in done.stderr
    assert r.zcard(QUEUE_NAME) == 0
