"""``rapidphoto``: the people's CLI (PROTOCOL §2): dev tokens, hand-made jobs, a simulated pipeline.

    rapidphoto token <user_id> [--ttl 3600]
    rapidphoto start <session_id> <user_id> <total>
    rapidphoto complete <session_id> <photo_id>
    rapidphoto fail <session_id> <photo_id> <reason>
    rapidphoto simulate [--sessions N] [--photos M] [--rate R] [--failure-ratio F] [--seed S]
                        [--user U] [--users K] [--duplicates P] [--session-prefix PREFIX]
                        [--start-delay SECONDS] [--wait | --no-wait] [--timeout SECONDS]
    rapidphoto watch <session_id>... [--notifications] [--relay URL]... [--user U]
                     [--timeout SECONDS]

Configuration comes from the same environment variables as the services (``REDIS_URL``,
``JWT_SECRET``, ...; ``watch`` takes its token from ``RAPIDPHOTO_TOKEN``). Output is made for
scripts: ``token`` prints only the token and the enqueue commands only the job id, so
``TOKEN=$(rapidphoto token alice)`` works. Exit status: 0 done, 1 a runtime failure (Redis
unreachable, ``simulate --wait`` timed out, ``watch`` refused or timed out), 2 bad input or
configuration, with nothing enqueued.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rapidphoto_contract.ids import InvalidId
from rapidphoto_contract.jobs import InvalidCommand
from rapidphoto_contract.settings import ConfigError
from rapidphoto_tools import cli_jobs, cli_simulate, cli_watch
from rapidphoto_tools.cli_common import EXIT_FAILED, EXIT_USAGE, RedisUnavailable, error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapidphoto",
        description="RapidPhoto upload progress: dev tokens, hand-made jobs, simulated uploads, "
        "live progress. "
        "Reads REDIS_URL, JWT_SECRET, ... like the services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_jobs.add_parsers(sub)
    cli_simulate.add_parser(sub)
    cli_watch.add_parser(sub)
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
        error(str(exc))
        return EXIT_USAGE
    except RedisUnavailable as exc:
        error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
