"""``rapidphoto token|start|complete|fail``: a development token, one hand-made job."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Final

from arq.jobs import Job

from rapidphoto_contract.ids import validate_id
from rapidphoto_contract.jobs import CompletePhotoUpload, FailPhotoUpload, StartUploadSession
from rapidphoto_contract.settings import RedisConfig
from rapidphoto_tools.cli_common import EXIT_OK, dev_token, int_between, with_jobs
from rapidphoto_tools.client import UploadJobsClient

#: A development token lives a year at most; longer is a typo.
MAX_TTL_SECONDS: Final = 366 * 86_400


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token``, ``start``, ``complete`` and ``fail`` to the subcommands ``sub``."""
    token = sub.add_parser("token", help="print a development token for a user (JWT_SECRET)")
    token.add_argument("user_id")
    token.add_argument(
        "--ttl",
        type=int_between(1, MAX_TTL_SECONDS),
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


def _token(args: argparse.Namespace) -> int:
    print(dev_token(validate_id("user_id", args.user_id), ttl_seconds=args.ttl))
    return EXIT_OK


def _enqueue(send: Callable[[UploadJobsClient], Awaitable[Job]]) -> int:
    """Connect to ``REDIS_URL``, send one job, print its id."""
    print(with_jobs(RedisConfig.from_env().queue_redis_url, send).job_id)
    return EXIT_OK


# Each command validates its job before connecting: bad input never reaches Redis.


def _start(args: argparse.Namespace) -> int:
    cmd = StartUploadSession.parse(
        {"session_id": args.session_id, "user_id": args.user_id, "total_photos": args.total}
    )
    return _enqueue(
        lambda jobs: jobs.start_upload_session(cmd.session_id, cmd.user_id, cmd.total_photos)
    )


def _complete(args: argparse.Namespace) -> int:
    cmd = CompletePhotoUpload.parse({"session_id": args.session_id, "photo_id": args.photo_id})
    return _enqueue(lambda jobs: jobs.complete_photo_upload(cmd.session_id, cmd.photo_id))


def _fail(args: argparse.Namespace) -> int:
    cmd = FailPhotoUpload.parse(
        {"session_id": args.session_id, "photo_id": args.photo_id, "reason": args.reason}
    )
    return _enqueue(lambda jobs: jobs.fail_photo_upload(cmd.session_id, cmd.photo_id, cmd.reason))
