"""Locust scenarios for the relay (PROTOCOL §1's load tests), against a running stack.

    JWT_SECRET=<the relays' secret> .venv/bin/locust -f loadtests/locustfile.py --headless \\
        --scenario seed -u 1000 -r 100 -t 150s \\
        --relay-urls http://127.0.0.1:8081,http://127.0.0.1:8082 --redis-url redis://127.0.0.1:6379/0 \\
        --csv loadtests/results/seed/locust --summary-dir loadtests/results/seed

``loadtests/run_scenario.py`` starts a stack for a scenario and runs exactly that;
``loadtests/README.md`` gives each scenario's command and thresholds. Scenarios:

- ``seed``: one viewer per user, each on its own session; a publisher subprocess drives events
  through the real worker at ``--events-per-second``. Thresholds: p99 publish→receive below
  ``--p99-ms``, nothing lost or duplicated (compared with each session's log in Redis), every
  connection alive at the end, the publisher held its rate.
- ``heartbeat``: idle session streams held ``--hold-seconds``: all alive, each saw heartbeats, no
  silence longer than ``--heartbeat-seconds`` + 5 s.
- ``churn``: viewers arrive, reconnect (``Last-Event-ID``, to the other relay) and leave while
  events flow: nothing lost across reconnections, and afterwards the relays' subscribed channels
  and open streams (``/metrics``) back at their baseline and RSS within ``--rss-tolerance-mb``.

Latency is the event's own ``occurredAt`` (stamped by the worker from Redis' clock) to the moment
its HTTP chunk was read here, for events delivered live (not replayed after a reconnection). It is
reported to locust as request type ``SSE``, name ``publish→receive`` (so it lands in the CSV/HTML
report) and, exactly, in the summary. A miss sets the exit code to 1.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # locust puts only this file's folder on sys.path
    sys.path.insert(0, str(ROOT))

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import redis  # noqa: E402
from loadtests.ledger import (  # noqa: E402
    Check,
    Lineage,
    caught_up,
    check_lineage,
    fetch_logs,
    latency_summary,
    log_ends,
)
from loadtests.names import run_prefix, session_id, user_id  # noqa: E402
from loadtests.relay_probe import RelayGauges, read_gauges, rss_bytes  # noqa: E402
from loadtests.sse_client import (  # noqa: E402
    LOOPBACK_HOSTS,
    Frame,
    NotLoopback,
    SSEConnection,
    StreamError,
    loopback_origin,
)
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from rapidphoto_contract.tokens import mint_token  # noqa: E402

SCENARIOS = ("seed", "heartbeat", "churn")
SESSION_PATH = "/api/upload/sessions/{}/stream"
#: How long the final check waits for connected viewers to receive the log's last entries.
DRAIN_SECONDS = 15.0
#: How long after the run the relays get to drop every channel and stream (churn).
RELEASE_SECONDS = 30.0
#: Churn: a visit lasts this long (s), split into connections of this long (s) each.
VISIT_SECONDS = (6.0, 20.0)
SEGMENT_SECONDS = (1.5, 6.0)
#: Heartbeat: allowed lateness of a heartbeat past the interval (the relay ticks every second).
HEARTBEAT_SLACK_SECONDS = 5.0
#: The publisher must hold at least this share of the requested rate for the run to count.
MIN_RATE_SHARE = 0.95


def _raise_nofile() -> None:
    # 1,000 streams plus locust's own files need more than the usual 1,024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_raise_nofile()


def _options(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument("--scenario", choices=SCENARIOS, default="seed", help="default seed")
    parser.add_argument(
        "--relay-urls",
        default=env("RELAY_URLS", "http://127.0.0.1:8080"),
        help="comma separated loopback relay URLs (env RELAY_URLS)",
    )
    parser.add_argument(
        "--redis-url",
        default=env("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the stack's Redis (env REDIS_URL); JWT_SECRET comes from the environment",
    )
    parser.add_argument("--events-per-second", type=float, default=100.0)
    parser.add_argument(
        "--sessions", type=int, default=0, help="default: one per user (churn: 200)"
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=8.0,
        help="the publisher stops this long before the end, so every event can arrive",
    )
    parser.add_argument("--p99-ms", type=float, default=500.0, help="seed threshold")
    parser.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=float(env("SSE_HEARTBEAT_SECONDS", "15")),
        help="the relays' SSE_HEARTBEAT_SECONDS",
    )
    parser.add_argument("--hold-seconds", type=float, default=90.0, help="heartbeat threshold")
    parser.add_argument("--relay-pids", default="", help="comma separated, for RSS (churn)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=40.0, help="churn threshold")
    parser.add_argument("--summary-dir", default="", help="write summary.json/.txt here")


# --- the run's shared state -----------------------------------------------------------------------


class Run:
    """Everything the viewers record and the final check reads; one per locust process."""

    def __init__(self, environment: Any) -> None:
        opts = environment.parsed_options
        self.environment = environment
        self.scenario: str = opts.scenario
        self.relays = [u.strip().rstrip("/") for u in opts.relay_urls.split(",") if u.strip()]
        self.redis_url: str = opts.redis_url
        self.secret = os.environ.get("JWT_SECRET", "")
        self.users: int = opts.num_users or 1
        self.run_time: float = float(opts.run_time or 0)
        default_sessions = 200 if self.scenario == "churn" else self.users
        self.sessions: int = opts.sessions or default_sessions
        self.rate: float = 0.0 if self.scenario == "heartbeat" else opts.events_per_second
        self.settle: float = opts.settle_seconds
        self.p99_ms: float = opts.p99_ms
        self.heartbeat: float = opts.heartbeat_seconds
        self.hold: float = opts.hold_seconds
        self.relay_pids = [int(p) for p in opts.relay_pids.split(",") if p.strip()]
        self.rss_tolerance = opts.rss_tolerance_mb * 1024 * 1024
        self.summary_dir = Path(opts.summary_dir) if opts.summary_dir else None
        self.prefix = run_prefix()
        self.lineages: list[Lineage] = []
        self.latencies: list[float] = []
        self.replayed = 0
        self.counter = itertools.count()
        self.tokens: dict[str, str] = {}
        self.t0 = time.time()
        self.deadline = self.t0 + self.run_time + 60
        self.stopping = False
        self.fatal: str | None = None
        self.publisher: subprocess.Popen[str] | None = None
        self.ready = gevent.event.Event()
        self.published: dict[str, Any] | None = None
        self.baseline: list[RelayGauges] | None = None
        self.baseline_rss: list[int | None] = []
        self.samples: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.checks: list[tuple[str, bool, str]] = []
        self.closes = {"fin": 0, "rst": 0}

    def validate(self) -> str | None:
        if not self.relays:
            return "--relay-urls is empty"
        try:
            for url in self.relays:
                loopback_origin(url)
            redis_host = urlsplit(self.redis_url).hostname
            if redis_host is not None and redis_host not in LOOPBACK_HOSTS:
                raise NotLoopback(f"--redis-url host {redis_host!r} is not a loopback address")
        except NotLoopback as exc:
            return str(exc)
        if not self.secret:
            return "JWT_SECRET is not set (the relays' secret, used to mint the viewers' tokens)"
        if self.run_time <= 0:
            return "pass -t/--run-time: every load test is bounded in time"
        if self.settle >= self.run_time / 2:
            return "--settle-seconds must be under half the run time"
        return None

    def token(self, user_id: str) -> str:
        token = self.tokens.get(user_id)
        if token is None:
            # Valid well past the run: an expiring token would close streams (token-expired).
            token = mint_token(user_id, key=self.secret, ttl_seconds=self.run_time + 3600)
            self.tokens[user_id] = token
        return token

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)


_run: Run | None = None


def current() -> Run:
    assert _run is not None, "the init listener did not run"
    return _run


def _occurred_at(payload: Any) -> float | None:
    value = payload.get("occurredAt") if isinstance(payload, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# --- the viewer ------------------------------------------------------------------------------------


class StreamViewer(User):
    """One browser tab on one session stream; what it does depends on ``--scenario``."""

    wait_time = constant(0)

    @task
    def view(self) -> None:
        run = current()
        if run.fatal is None:
            if run.scenario == "churn":
                self._churn(run)
            else:
                self._hold(run)
        # Done (or the run is called off): sit out the rest of the run, bounded.
        gevent.sleep(max(0.0, run.deadline - time.time()))
        raise StopUser()

    def _fire(
        self, name: str, started: float, length: int = 0, exc: Exception | None = None
    ) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=max(0.0, (time.time() - started) * 1000),
            response_length=length,
            exception=exc,
            context={},
        )

    def _hold(self, run: Run) -> None:
        """seed / heartbeat: one connection, held until the run ends."""
        n = next(run.counter)
        k = n % run.sessions
        lineage = Lineage(session_id(run.prefix, k), user_id(run.prefix, k))
        run.lineages.append(lineage)
        self._stream(run, lineage, run.relays[n % len(run.relays)], until=run.deadline)

    def _churn(self, run: Run) -> None:
        """Visits: arrive (snapshot), reconnect with Last-Event-ID to the other relay, leave."""
        rng = random.Random()
        while not run.stopping and time.time() < run.deadline:
            k = rng.randrange(run.sessions)
            lineage = Lineage(session_id(run.prefix, k), user_id(run.prefix, k))
            run.lineages.append(lineage)
            relay = rng.randrange(len(run.relays))
            visit_end = time.time() + rng.uniform(*VISIT_SECONDS)
            resume = False
            while True:
                segment_end = min(visit_end, time.time() + rng.uniform(*SEGMENT_SECONDS))
                abort = rng.random() < 0.5
                self._stream(
                    run, lineage, run.relays[relay], until=segment_end, resume=resume, abort=abort
                )
                if lineage.ended_by_relay or run.stopping or time.time() >= visit_end:
                    break
                resume = True
                relay = (relay + 1) % len(run.relays)  # any instance resumes any stream
                gevent.sleep(rng.uniform(0.0, 0.5))
            lineage.left = True
            gevent.sleep(rng.uniform(0.0, 2.0))

    def _stream(
        self,
        run: Run,
        lineage: Lineage,
        relay: str,
        *,
        until: float,
        resume: bool = False,
        abort: bool = False,
    ) -> None:
        """One connection of ``lineage``: read frames until ``until``, or until it ends."""
        last_id = lineage.cursor() if resume else None
        conn = SSEConnection(
            relay,
            SESSION_PATH.format(lineage.session_id),
            run.token(lineage.user_id),
            last_event_id=last_id,
            # A stream silent for two heartbeats and more is dead.
            read_timeout=run.heartbeat * 2 + 10,
        )
        name = "reconnect (Last-Event-ID)" if last_id else "connect"
        started = time.time()
        try:
            conn.open()
        except (StreamError, OSError) as exc:
            lineage.ended_by_relay = f"{name}: {exc}"
            lineage.errors.append(lineage.ended_by_relay)
            self._fire(name, started, exc=exc)
            conn.close()
            return
        self._fire(name, started)
        lineage.connections += 1
        lineage.reconnects += bool(last_id)
        if lineage.first_open_at is None:
            lineage.first_open_at = conn.opened_at
        lineage.connected = True
        timer = gevent.Timeout(max(0.0, until - time.time()))
        timer.start()
        last_rx = conn.opened_at
        try:
            for frame in conn.frames():
                lineage.max_gap = max(lineage.max_gap, frame.received_at - last_rx)
                if self._on_frame(run, lineage, conn, frame, last_rx):
                    break
                last_rx = frame.received_at
            else:
                lineage.ended_by_relay = "the relay ended the response"
                self._fire("stream", started, exc=StreamError(lineage.ended_by_relay))
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            run.closes["rst" if abort else "fin"] += 1  # our choice: this connection is over
        except (StreamError, OSError) as exc:  # TimeoutError (silence) is an OSError
            lineage.ended_by_relay = f"{type(exc).__name__}: {exc}"
            lineage.errors.append(lineage.ended_by_relay)
            self._fire("stream", started, exc=exc)
        finally:
            timer.close()
            lineage.connected = False
            conn.close(abort=abort)

    def _on_frame(
        self, run: Run, lineage: Lineage, conn: SSEConnection, frame: Frame, last_rx: float
    ) -> bool:
        """Record one frame; True when the stream is over (``STREAM_CLOSED``)."""
        if frame.is_heartbeat:
            lineage.heartbeats += 1
            self._fire("heartbeat (gap)", last_rx, frame.size)
            return False
        if frame.data is None:
            return False  # the retry: frame
        if frame.event == "SESSION_SNAPSHOT":
            lineage.record_snapshot(frame.id, resumed=conn.last_event_id is not None)
            return False
        if frame.event == "STREAM_CLOSED":
            reason = (frame.json() or {}).get("reason")
            lineage.ended_by_relay = f"STREAM_CLOSED {reason}"
            self._fire("stream", conn.opened_at, exc=StreamError(lineage.ended_by_relay))
            return True
        if frame.id is None:
            lineage.errors.append(f"{frame.event} without an id")
            return False
        lineage.record_event(frame.id)
        occurred = _occurred_at(frame.json())
        if occurred is None:
            lineage.errors.append(f"{frame.event} {frame.id} without occurredAt")
        elif occurred >= conn.opened_at:
            # Published while this connection was open: a live delivery.
            latency_ms = max(0.0, (frame.received_at - occurred) * 1000)
            run.latencies.append(latency_ms)
            self.environment.events.request.fire(
                request_type="SSE",
                name="publish→receive",
                response_time=latency_ms,
                response_length=frame.size,
                exception=None,
                context={},
            )
        else:
            run.replayed += 1  # from the log after a reconnection: not a delivery latency
        return False


# --- set-up, final checks, summary -------------------------------------------------------------------


def _init(environment: Any, **_: Any) -> None:
    global _run
    if environment.parsed_options is None:  # imported by a tool, not run
        return
    # Locust starts its --run-time timer on gevent's cached loop clock (gevent >= 1.3 does not
    # refresh it for a timer started outside the loop), last read before this file was imported:
    # on a busy machine 15 s of start-up came off a 20 s run and the publisher never got to send.
    gevent.get_hub().loop.update_now()
    _run = Run(environment)
    problem = _run.validate()
    if problem is not None:
        print(f"locustfile: {problem}", file=sys.stderr)
        sys.exit(2)


def _read_publisher(run: Run, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        kind = message.get("event")
        if kind == "ready":
            run.ready.set()
        elif kind == "done":
            run.published = message
        elif kind == "error":
            run.fatal = f"publisher: {message.get('message')}"
            run.ready.set()
    if not run.ready.is_set():
        run.fatal = run.fatal or f"publisher exited with {proc.wait()} before it was ready"
        run.ready.set()


def _gauges(run: Run, quiet: bool = False) -> list[RelayGauges] | None:
    try:
        return [read_gauges(url) for url in run.relays]
    except OSError as exc:
        if not quiet:
            print(f"locustfile: /metrics unreadable: {exc}", file=sys.stderr)
        return None


def _sample(run: Run) -> None:
    """Every 5 s: the relays' gauges and RSS (written to resources.csv)."""
    while True:
        gauges = _gauges(run, quiet=True) or []
        run.samples.append(
            {
                "t": round(time.time() - run.t0, 1),
                "open_streams": sum(g.open_streams for g in gauges),
                "subscribed_channels": sum(g.subscribed_channels for g in gauges),
                "rss_mb": [round((rss_bytes(pid) or 0) / 2**20, 1) for pid in run.relay_pids],
            }
        )
        gevent.sleep(5)


def _test_start(environment: Any, **_: Any) -> None:
    run = current()
    run.t0 = time.time()
    run.deadline = run.t0 + run.run_time + 60
    if run.scenario == "churn":
        run.baseline = _gauges(run)
        run.baseline_rss = [rss_bytes(pid) for pid in run.relay_pids]
    gevent.spawn(_sample, run)
    opts = environment.parsed_options
    spawn_seconds = run.users / max(opts.spawn_rate or 1, 0.1)
    argv = [
        sys.executable,
        "-m",
        "loadtests.publisher",
        "--redis-url",
        run.redis_url,
        "--prefix",
        run.prefix,
        "--sessions",
        str(run.sessions),
        "--rate",
        str(run.rate),
        # Events start once every viewer is connected (they would be correct before, too).
        "--start-delay",
        str(math.ceil(spawn_seconds) + 1),
        "--stop-at",
        str(run.t0 + run.run_time - run.settle),
    ]
    print(
        f"locustfile: scenario {run.scenario}, run {run.prefix}: {run.sessions} session(s), "
        f"{run.users} viewer(s), {run.rate:g} events/s, relays {', '.join(run.relays)}",
        flush=True,
    )
    run.publisher = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    gevent.spawn(_read_publisher, run, run.publisher)
    if not run.ready.wait(timeout=90):
        run.fatal = "publisher did not create the sessions within 90 s"
    if run.fatal is not None:
        print(f"locustfile: {run.fatal}; stopping", file=sys.stderr, flush=True)
        gevent.spawn(environment.runner.quit)


def _test_stopping(environment: Any, **_: Any) -> None:
    """Before locust stops the viewers: drain, then check them against the logs."""
    run = current()
    run.stopping = True
    if run.fatal is not None:
        return
    started = time.monotonic()
    while run.rate > 0 and run.published is None and time.monotonic() - started < run.settle:
        gevent.sleep(0.2)
    client = run.redis()
    try:
        logs = fetch_logs(client, {lin.session_id for lin in run.lineages})
        ends = log_ends(logs)
        while time.monotonic() - started < DRAIN_SECONDS + run.settle and not all(
            caught_up(lin, ends.get(lin.session_id)) for lin in run.lineages if lin.alive
        ):
            gevent.sleep(0.2)
        alive = {id(lin): lin.alive for lin in run.lineages}  # frozen before the viewers stop
        now = time.time()
        total = Check()
        for lin in run.lineages:
            total.add(check_lineage(lin, logs.get(lin.session_id, []), to_end=alive[id(lin)]))
    finally:
        client.close()
    _figures(run, total, alive, now)


def _figures(run: Run, total: Check, alive: dict[int, bool], now: float) -> None:
    lineages = run.lineages
    f = run.figures
    f["scenario"] = run.scenario
    f["run"] = run.prefix
    f["relays"] = len(run.relays)
    f["viewers_expected"] = run.users
    f["sessions"] = run.sessions
    f["lineages"] = len(lineages)
    f["connections"] = sum(lin.connections for lin in lineages)
    f["reconnections"] = sum(lin.reconnects for lin in lineages)
    f["alive_at_end"] = sum(alive.values())
    f["ended_by_relay_or_error"] = sum(1 for lin in lineages if lin.ended_by_relay)
    f["errors"] = sorted({e for lin in lineages for e in lin.errors})[:10]
    f["events_expected"] = total.expected
    f["events_received"] = total.received
    f["events_replayed_after_reconnect"] = run.replayed
    f["lost"] = total.lost
    f["duplicates"] = total.duplicates
    f["unexpected"] = total.unexpected
    f["out_of_order"] = total.out_of_order
    f["resyncs"] = sum(lin.resyncs for lin in lineages)
    f["latency"] = latency_summary(run.latencies)
    f["publisher"] = run.published
    beats = sorted(lin.heartbeats for lin in lineages)
    held = sorted(now - lin.first_open_at for lin in lineages if lin.first_open_at)
    f["heartbeats_min"] = beats[0] if beats else 0
    f["heartbeats_max"] = beats[-1] if beats else 0
    f["max_silence_s"] = round(max((lin.max_gap for lin in lineages), default=0.0), 1)
    f["held_min_s"] = round(held[0], 1) if held else 0.0
    f["closes_by_viewer"] = dict(run.closes)
    f["open_streams_peak"] = max((s["open_streams"] for s in run.samples), default=0)
    f["rss_mb_peak"] = [
        max((s["rss_mb"][i] for s in run.samples), default=0.0) for i in range(len(run.relay_pids))
    ]


def _test_stop(environment: Any, **_: Any) -> None:
    """After the viewers are gone: stop the publisher; churn: wait for the relays to let go."""
    run = current()
    proc = run.publisher
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    if run.scenario != "churn" or run.fatal is not None or run.baseline is None:
        return
    deadline = time.monotonic() + RELEASE_SECONDS
    after = _gauges(run)
    while time.monotonic() < deadline:
        after = _gauges(run)
        if after is not None and all(
            a.open_streams == 0 and a.subscribed_channels <= b.subscribed_channels
            for a, b in zip(after, run.baseline, strict=True)
        ):
            break
        gevent.sleep(0.5)
    gevent.sleep(2)  # let the relays' allocator settle before reading RSS
    f = run.figures
    f["baseline"] = [g.__dict__ for g in run.baseline]
    f["after"] = [g.__dict__ for g in after] if after else None
    f["rss_mb_baseline"] = [_mb(r) for r in run.baseline_rss]
    f["rss_mb_after"] = [_mb(rss_bytes(pid)) for pid in run.relay_pids]


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _checks(run: Run) -> list[tuple[str, bool, str]]:
    f = run.figures
    out: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append((name, ok, detail))

    if run.fatal is not None:
        check("run started", False, run.fatal)
        return out
    if run.rate > 0:
        pub = f.get("publisher") or {}
        rate = float(pub.get("rate", 0.0))
        check(
            "publisher held its rate",
            rate >= MIN_RATE_SHARE * run.rate,
            f"{pub.get('sent', 0)} events in {pub.get('seconds', 0)} s = {rate:g}/s "
            f"(asked {run.rate:g}/s)",
        )
    no_loss = f["lost"] == 0 and f["unexpected"] == 0 and f["out_of_order"] == 0
    if run.scenario in ("seed", "churn"):
        check(
            "0 lost",
            no_loss,
            f"lost {f['lost']}, unexpected {f['unexpected']}, out of order {f['out_of_order']} "
            f"of {f['events_expected']} expected",
        )
        check("0 duplicates", f["duplicates"] == 0, f"{f['duplicates']} duplicates")
        check("0 resyncs", f["resyncs"] == 0, f"{f['resyncs']} snapshot(s) after Last-Event-ID")
    if run.scenario in ("seed", "heartbeat"):
        check(
            "every connection alive at the end",
            f["alive_at_end"] == run.users and f["lineages"] == run.users,
            f"{f['alive_at_end']} of {run.users} alive ({f['lineages']} connected); "
            f"{'; '.join(f['errors']) or 'no errors'}",
        )
    if run.scenario == "seed":
        lat = f["latency"]
        check(
            f"p99 publish→receive < {run.p99_ms:g} ms",
            lat["count"] > 0 and lat["p99_ms"] < run.p99_ms,
            f"p50 {lat['p50_ms']} / p90 {lat['p90_ms']} / p99 {lat['p99_ms']} / max "
            f"{lat['max_ms']} ms over {lat['count']} deliveries",
        )
    if run.scenario == "heartbeat":
        need = max(1, math.floor(f["held_min_s"] / run.heartbeat) - 1)
        check(
            "every stream saw heartbeats",
            f["heartbeats_min"] >= need,
            f"min {f['heartbeats_min']}, max {f['heartbeats_max']} per stream (need {need})",
        )
        limit = run.heartbeat + HEARTBEAT_SLACK_SECONDS
        check(
            f"no silence over {limit:g} s",
            f["max_silence_s"] <= limit,
            f"longest silence {f['max_silence_s']} s",
        )
        check(
            f"held {run.hold:g} s",
            f["held_min_s"] >= run.hold,
            f"shortest stream held {f['held_min_s']} s",
        )
    if run.scenario == "churn":
        check(
            "no stream ended by the relay",
            f["ended_by_relay_or_error"] == 0,
            f"{f['ended_by_relay_or_error']}: {'; '.join(f['errors']) or '-'}",
        )
        check(
            "churn happened",
            f["reconnections"] > 0 and f["lineages"] > run.users,
            f"{f['lineages']} visits, {f['connections']} connections, "
            f"{f['reconnections']} reconnections, closes {f['closes_by_viewer']}",
        )
        after, base = f.get("after"), f.get("baseline")
        check(
            "channels and streams back to baseline",
            after is not None
            and base is not None
            and all(
                a["open_streams"] == 0 and a["subscribed_channels"] <= b["subscribed_channels"]
                for a, b in zip(after, base, strict=True)
            ),
            f"baseline {base}, after {after}",
        )
        if run.relay_pids:
            base_rss, after_rss = f["rss_mb_baseline"], f["rss_mb_after"]
            tol = run.rss_tolerance / 2**20
            check(
                f"RSS back within {tol:g} MB of baseline",
                all(
                    b is not None and a is not None and a - b <= tol
                    for a, b in zip(after_rss, base_rss, strict=True)
                ),
                f"baseline {base_rss} MB, peak {f['rss_mb_peak']} MB, after {after_rss} MB",
            )
    return out


def _text(run: Run) -> str:
    f = run.figures
    lines = [f"=== rapidphoto load test: {run.scenario} (run {run.prefix}) ==="]
    if f:
        lat = f["latency"]
        pub = f.get("publisher") or {}
        lines.append(
            f"viewers: {run.users} expected, {f['lineages']} lineage(s), {f['connections']} "
            f"connection(s), {f['reconnections']} reconnection(s), {f['alive_at_end']} alive "
            f"at the end, {len(run.relays)} relay(s)"
        )
        if run.rate > 0:
            lines += [
                f"publisher: {pub.get('sent', 0)} events in {pub.get('seconds', 0)} s "
                f"({pub.get('rate', 0)}/s, asked {run.rate:g}/s) over {run.sessions} sessions",
                f"publish→receive: p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms, "
                f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms ({lat['count']} live "
                f"deliveries, {f['events_replayed_after_reconnect']} replayed after reconnections)",
                f"checked against the logs: {f['events_expected']} expected, "
                f"{f['events_received']} received; lost {f['lost']}, duplicates "
                f"{f['duplicates']}, unexpected {f['unexpected']}, out of order "
                f"{f['out_of_order']}, resyncs {f['resyncs']}",
            ]
        lines.append(
            f"heartbeats per stream: {f['heartbeats_min']}..{f['heartbeats_max']}, longest "
            f"silence {f['max_silence_s']} s, shortest hold {f['held_min_s']} s"
        )
        lines.append(
            f"relays: peak {f['open_streams_peak']:g} open streams, peak RSS "
            f"{f['rss_mb_peak'] or 'not measured (no --relay-pids)'} MB"
        )
    for name, ok, detail in run.checks:
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    passed = all(ok for _, ok, _ in run.checks)
    lines.append(f"RESULT: {'PASS' if passed else 'FAIL'}")
    return "\n".join(lines) + "\n"


def _quitting(environment: Any, **_: Any) -> None:
    run = _run
    if run is None:
        return
    run.checks = _checks(run)
    text = _text(run)
    print(text, flush=True)
    if run.summary_dir is not None:
        run.summary_dir.mkdir(parents=True, exist_ok=True)
        (run.summary_dir / "summary.txt").write_text(text)
        (run.summary_dir / "summary.json").write_text(
            json.dumps(
                {
                    "figures": run.figures,
                    "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in run.checks],
                    "passed": all(ok for _, ok, _ in run.checks),
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        with (run.summary_dir / "resources.csv").open("w") as out:
            out.write("t_s,open_streams,subscribed_channels,relay_rss_mb\n")
            for s in run.samples:
                rss = " ".join(str(v) for v in s["rss_mb"])
                out.write(f"{s['t']},{s['open_streams']},{s['subscribed_channels']},{rss}\n")
    if not all(ok for _, ok, _ in run.checks):
        environment.process_exit_code = 1


# Registered here, not with decorators: locust's EventHook is untyped, and an untyped decorator would
# erase these functions' types (mypy strict).
_hooks: Any = events
_hooks.init_command_line_parser.add_listener(_options)
_hooks.init.add_listener(_init)
_hooks.test_start.add_listener(_test_start)
_hooks.test_stopping.add_listener(_test_stopping)
_hooks.test_stop.add_listener(_test_stop)
_hooks.quitting.add_listener(_quitting)
