"""``rapidphoto``: the people's CLI (PROTOCOL §2): dev tokens, hand-made jobs, a simulated pipeline.

    rapidphoto token <user_id> [--ttl 3600]
    rapidphoto start <session_id> <user_id> <total>
    rapidphoto complete <session_id> <photo_id>
    rapidphoto fail <session_id> <photo_id> <reason>
    rapidphoto simulate [--sessions N] [--photos M] [--rate R] [--failure-ratio F] [--seed S]
                        [--user U] [--users K] [--duplicates P] [--session-prefix PREFIX]
                        [--start-delay SECONDS] [--wait | --no-wait] [--timeout SECONDS]

Configuration comes from the same environment variables as the services (``REDIS_URL``,
``JWT_SECRET``, ...). Output is made for scripts: ``token`` prints only the token and the enqueue
commands only the job id, so ``TOKEN=$(rapidphoto token alice)`` works. Exit status: 0 done,
1 a runtime failure (Redis unreachable, ``simulate --wait`` timed out), 2 bad input or
configuration, with nothing enqueued.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from arq.jobs import Job
from redis.exceptions import RedisError

from rapidphoto_contract.ids import InvalidId, validate_id
from rapidphoto_contract.jobs import (
    MAX_TOTAL_PHOTOS,
    CompletePhotoUpload,
    FailPhotoUpload,
    InvalidCommand,
    StartUploadSession,
    UploadJobsClient,
)
from rapidphoto_contract.settings import ConfigError, Settings
from rapidphoto_contract.simulation import (
    MAX_SESSIONS,
    ApplyWatch,
    SimulationPlan,
    SimulationSpec,
    plan_simulation,
    run_simulation,
    wait_until_applied,
)
from rapidphoto_contract.tokens import mint_for_settings

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: A development token lives a year at most; longer is a typo.
MAX_TTL_SECONDS: Final = 366 * 86_400

T = TypeVar("T")


# --- argument types (argparse turns their errors into "argument --x: ..." and exit 2) ------------


def _int_between(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float_between(lo: float, hi: float, *, open_low: bool = False) -> Callable[[str], float]:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapidphoto",
        description="RapidPhoto upload progress: dev tokens, hand-made jobs, simulated uploads. "
        "Reads REDIS_URL, JWT_SECRET, ... like the services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = sub.add_parser("token", help="print a development token for a user (JWT_SECRET)")
    token.add_argument("user_id")
    token.add_argument(
        "--ttl",
        type=_int_between(1, MAX_TTL_SECONDS),
        default=3600,
        help="lifetime in seconds (default 3600)",
    )
    token.set_defaults(run=_token)

    start = sub.add_parser("start", help="enqueue start_upload_session; prints the job id")
    start.add_argument("session_id")
    start.add_argument("user_id")
    start.add_argument("total", type=int, help="total photos, 1..10000")
    start.set_defaults(run=_start)

    complete = sub.add_parser("complete", help="enqueue complete_photo_upload; prints the job id")
    complete.add_argument("session_id")
    complete.add_argument("photo_id")
    complete.set_defaults(run=_complete)

    fail = sub.add_parser("fail", help="enqueue fail_photo_upload; prints the job id")
    fail.add_argument("session_id")
    fail.add_argument("photo_id")
    fail.add_argument("reason")
    fail.set_defaults(run=_fail)

    sim = sub.add_parser(
        "simulate",
        help="simulate an upload pipeline: N sessions x M photos at a rate",
        description="Start N sessions, then send their photo outcomes at R photos/s in total, "
        "each failing with probability F. Deterministic for a given --seed (session ids "
        "are sim-<seed>-<n> unless --session-prefix, so use a new seed for fresh sessions).",
    )
    sim.add_argument(
        "--sessions", type=_int_between(1, MAX_SESSIONS), default=3, metavar="N", help="default 3"
    )
    sim.add_argument(
        "--photos",
        type=_int_between(1, MAX_TOTAL_PHOTOS),
        default=20,
        metavar="M",
        help="photos per session (default 20)",
    )
    sim.add_argument(
        "--rate",
        type=_float_between(0, 1_000_000, open_low=True),
        default=10.0,
        metavar="R",
        help="photo outcomes per second, all sessions together; a duplicate rides along with "
        "its original (default 10)",
    )
    sim.add_argument(
        "--failure-ratio", type=_float_between(0, 1), default=0.1, metavar="F", help="default 0.1"
    )
    sim.add_argument(
        "--seed",
        type=_int_between(0, 2**63 - 1),
        default=None,
        metavar="S",
        help="default: a random seed, printed so the run can be repeated",
    )
    sim.add_argument("--user", default="demo", metavar="U", help="owner (default demo)")
    sim.add_argument(
        "--users",
        type=_int_between(1, MAX_SESSIONS),
        default=1,
        metavar="K",
        help="spread sessions over K owners U-1..U-K (default 1: U owns all)",
    )
    sim.add_argument(
        "--session-prefix",
        default=None,
        metavar="PREFIX",
        help="session ids are PREFIX-1..PREFIX-N (default sim-<seed>)",
    )
    sim.add_argument(
        "--start-delay",
        type=_float_between(0, 3600),
        default=0.0,
        metavar="SECONDS",
        help="pause between starting the sessions and the first photo (default 0)",
    )
    sim.add_argument(
        "--duplicates",
        type=_float_between(0, 1),
        default=0.0,
        metavar="P",
        help="probability that a photo job is delivered twice (default 0)",
    )
    sim.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until the worker has applied every job (default: wait)",
    )
    sim.add_argument(
        "--timeout",
        type=_float_between(0, 86_400, open_low=True),
        default=60.0,
        metavar="SECONDS",
        help="how long --wait waits after the last job is sent (default 60)",
    )
    sim.set_defaults(run=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage (error: 2) or help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (InvalidCommand, InvalidId, ConfigError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except _RedisUnavailable as exc:
        _error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _error(message: str) -> None:
    print(f"rapidphoto: error: {message}", file=sys.stderr)


class _RedisUnavailable(Exception):
    pass


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _with_jobs(settings: Settings, use: Callable[[UploadJobsClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with UploadJobsClient.connect(settings.redis_url) as jobs:
            return await use(jobs)

    try:
        return asyncio.run(go())
    except (RedisError, OSError) as exc:
        raise _RedisUnavailable(f"Redis at {redact_url(settings.redis_url)}: {exc}") from None


# --- commands -------------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    user_id = validate_id("user_id", args.user_id)
    settings = Settings.from_env()
    if settings.jwt_secret is None:
        raise ConfigError(
            "JWT_SECRET", "not set; `rapidphoto token` signs development tokens with it"
        )
    try:
        token = mint_for_settings(user_id, settings, ttl_seconds=args.ttl)
    except ValueError as exc:  # no HS* algorithm listed
        raise ConfigError("JWT_ALGORITHMS", str(exc)) from None
    print(token)
    return EXIT_OK


def _print_job(job: Job) -> int:
    print(job.job_id)
    return EXIT_OK


def _start(args: argparse.Namespace) -> int:
    # Validated before connecting: bad input never reaches Redis.
    cmd = StartUploadSession.parse(
        {"session_id": args.session_id, "user_id": args.user_id, "total_photos": args.total}
    )
    settings = Settings.from_env()
    return _print_job(
        _with_jobs(
            settings,
            lambda jobs: jobs.start_upload_session(cmd.session_id, cmd.user_id, cmd.total_photos),
        )
    )


def _complete(args: argparse.Namespace) -> int:
    cmd = CompletePhotoUpload.parse({"session_id": args.session_id, "photo_id": args.photo_id})
    settings = Settings.from_env()
    return _print_job(
        _with_jobs(settings, lambda jobs: jobs.complete_photo_upload(cmd.session_id, cmd.photo_id))
    )


def _fail(args: argparse.Namespace) -> int:
    cmd = FailPhotoUpload.parse(
        {"session_id": args.session_id, "photo_id": args.photo_id, "reason": args.reason}
    )
    settings = Settings.from_env()
    return _print_job(
        _with_jobs(
            settings,
            lambda jobs: jobs.fail_photo_upload(cmd.session_id, cmd.photo_id, cmd.reason),
        )
    )


def _simulate(args: argparse.Namespace) -> int:
    out = sys.stdout
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    spec = SimulationSpec(
        sessions=args.sessions,
        photos=args.photos,
        rate=args.rate,
        failure_ratio=args.failure_ratio,
        seed=seed,
        user=validate_id("--user", args.user),
        users=args.users,
        duplicates=args.duplicates,
        session_prefix=(
            None
            if args.session_prefix is None
            else validate_id("--session-prefix", args.session_prefix)
        ),
    )
    plan = plan_simulation(spec)  # validates everything before anything is sent
    settings = Settings.from_env()

    out.write(
        f"simulating {spec.sessions} session(s) x {spec.photos} photo(s) at {spec.rate:g} photos/s"
        f", failure ratio {spec.failure_ratio:g}, duplicates {spec.duplicates:g}, seed {seed}"
        + ("" if args.seed is not None else f" (repeat with --seed {seed})")
        + "\n"
    )
    for start in plan.sessions:
        out.write(f"session {start.session_id} owner {start.user_id}\n")
    first = plan.sessions[0]
    out.write(
        f"watch one: TOKEN=$(rapidphoto token {first.user_id}); curl -N -H "
        f'"Authorization: Bearer $TOKEN" http://{settings.relay_host}:{settings.relay_port}'
        f"/api/upload/sessions/{first.session_id}/stream\n"
    )
    out.flush()
    return _with_jobs(settings, lambda jobs: _simulate_with(jobs, plan, spec, args, out))


async def _simulate_with(
    jobs: UploadJobsClient,
    plan: SimulationPlan,
    spec: SimulationSpec,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    report = await run_simulation(plan, jobs, spec.rate, out, start_delay=args.start_delay)
    out.write(
        f"sent: {report.start_jobs} start job(s), {report.photos} photo outcome(s) "
        f"({report.failures} failed) as {report.photo_jobs} job(s) ({plan.duplicates} duplicated) "
        f"in {report.elapsed:.2f}s, {report.rate:.1f} photos/s\n"
    )
    if not args.wait:
        return EXIT_OK
    watch = ApplyWatch(expected=plan.expected())
    try:
        # Both: the wait's own deadline cannot be lost (issue 9, fault 3); the outer one also
        # cuts a command that hangs (the pool lets cancellations through, redis_cancel).
        async with asyncio.timeout(args.timeout):
            await wait_until_applied(jobs, watch, out, timeout=args.timeout)
    except TimeoutError:
        pending = watch.pending()
        _error(
            f"timed out after {args.timeout:g}s: {len(pending)} of {len(plan.sessions)} "
            "session(s) not applied (is rapidphoto-worker running on the same REDIS_URL?)"
        )
        for sid, seen in list(pending.items())[:10]:
            up, failed = watch.expected[sid]
            now = "not created" if seen is None else f"uploaded {seen[0]}, failed {seen[1]}"
            print(f"  {sid}: {now}; expected uploaded {up}, failed {failed}", file=sys.stderr)
        return EXIT_FAILED
    uploaded = sum(up for up, _ in watch.expected.values())
    out.write(
        f"applied: all {len(plan.sessions)} session(s) match the plan "
        f"({uploaded} uploaded, {plan.failures} failed)\n"
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
