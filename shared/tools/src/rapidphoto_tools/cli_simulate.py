"""``rapidphoto simulate``: a simulated upload pipeline (:mod:`rapidphoto_tools.simulation`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from redis.asyncio.cluster import RedisCluster

from rapidphoto_contract.ids import validate_id
from rapidphoto_contract.jobs import MAX_TOTAL_PHOTOS
from rapidphoto_contract.settings import ListenConfig, RedisConfig
from rapidphoto_tools.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    error,
    float_between,
    int_between,
    with_jobs,
)
from rapidphoto_tools.client import UploadJobsClient
from rapidphoto_tools.simulation import (
    MAX_SESSIONS,
    ApplyWatch,
    SimulationPlan,
    SimulationSpec,
    plan_simulation,
    run_simulation,
    wait_until_applied,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``simulate`` to the subcommands ``sub``."""
    sim = sub.add_parser(
        "simulate",
        help="simulate an upload pipeline: N sessions x M photos at a rate",
        description="Start N sessions, then send their photo outcomes at R photos/s in total, "
        "each failing with probability F. Deterministic for a given --seed (session ids "
        "are sim-<seed>-<n> unless --session-prefix, so use a new seed for fresh sessions).",
    )
    sim.add_argument(
        "--sessions", type=int_between(1, MAX_SESSIONS), default=3, metavar="N", help="default 3"
    )
    sim.add_argument(
        "--photos",
        type=int_between(1, MAX_TOTAL_PHOTOS),
        default=20,
        metavar="M",
        help="photos per session (default 20)",
    )
    sim.add_argument(
        "--rate",
        type=float_between(0, 1_000_000, open_low=True),
        default=10.0,
        metavar="R",
        help="photo outcomes per second, all sessions together; a duplicate rides along with "
        "its original (default 10)",
    )
    sim.add_argument(
        "--failure-ratio", type=float_between(0, 1), default=0.1, metavar="F", help="default 0.1"
    )
    sim.add_argument(
        "--seed",
        type=int_between(0, 2**63 - 1),
        default=None,
        metavar="S",
        help="default: a random seed, printed so the run can be repeated",
    )
    sim.add_argument("--user", default="demo", metavar="U", help="owner (default demo)")
    sim.add_argument(
        "--users",
        type=int_between(1, MAX_SESSIONS),
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
        type=float_between(0, 3600),
        default=0.0,
        metavar="SECONDS",
        help="pause between starting the sessions and the first photo (default 0)",
    )
    sim.add_argument(
        "--duplicates",
        type=float_between(0, 1),
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
        type=float_between(0, 86_400, open_low=True),
        default=60.0,
        metavar="SECONDS",
        help="how long --wait waits after the last job is sent (default 60)",
    )
    sim.set_defaults(run=_simulate)


@contextlib.asynccontextmanager
async def state_reader(settings: RedisConfig) -> AsyncIterator[Any]:
    """A client of the sessions' Redis for the wait, or None: the queue's is the same server."""
    if not settings.redis_cluster:
        yield None
        return
    cluster = RedisCluster.from_url(settings.redis_url, decode_responses=True)
    try:
        yield cluster
    finally:
        await cluster.aclose()


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
    settings = RedisConfig.from_env()
    relay = ListenConfig.from_env()

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
        f'"Authorization: Bearer $TOKEN" http://{relay.relay_host}:{relay.relay_port}'
        f"/api/upload/sessions/{first.session_id}/stream\n"
    )
    out.flush()
    return with_jobs(
        settings.queue_redis_url,
        lambda jobs: _simulate_with(jobs, plan, spec, args, out, settings),
    )


async def _simulate_with(
    jobs: UploadJobsClient,
    plan: SimulationPlan,
    spec: SimulationSpec,
    args: argparse.Namespace,
    out: TextIO,
    settings: RedisConfig,
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
        async with asyncio.timeout(args.timeout), state_reader(settings) as state:
            await wait_until_applied(jobs, watch, out, timeout=args.timeout, state=state)
    except TimeoutError:
        pending = watch.pending()
        error(
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
