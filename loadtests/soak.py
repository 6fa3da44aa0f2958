"""Soak: real use of 2 relays and a worker for a long time, every delivery checked, resources sampled.

    .tools/bin/uv run python loadtests/soak.py                      # the hour (defaults below)
    .tools/bin/uv run python loadtests/soak.py --duration 60 --streams 200 --restart-every 25 \\
        --segment 2 8 --results /tmp/soak

It starts a private ``redis-server``, one ``rapidphoto-worker`` and two ``rapidphoto-relay``
processes (the starters of ``tests/support``), then for ``--duration`` seconds:

- the upload pipeline (``loadtests/publisher.py``, a subprocess): ``--sessions`` sessions created
  through arq and the real worker, then photo outcomes at ``--rate`` per second (each one event);
- ``--streams`` viewers (gevent, ``loadtests/sse_client.py``), spread over the sessions and both
  relays: each reads for ``--segment`` seconds, disconnects (half politely, half with a reset) and
  resumes with ``Last-Event-ID`` on the other relay; the whole run is one ``Lineage`` per viewer
  (``loadtests/ledger.py``), so every event must arrive exactly once, in log order;
- every ``--restart-every`` seconds one relay (alternately) gets SIGTERM and is started again on
  its port: its viewers get ``STREAM_CLOSED`` (``shutdown``) and resume on the other relay or the
  restarted one;
- every ``--sample-every`` seconds a row of ``resources.csv``: RSS, open descriptors and CPU time
  of each process from ``/proc``, the relays' open streams and subscribed channels from their
  ``/metrics``, Redis' ``used_memory``, the events published and received, the load average.

At the end the publisher stops, the viewers catch up with the logs' ends and close, and the relays
must be back to 0 streams and 0 channels (waited for). Then every viewer's events are checked
against its session's log in Redis. Results in ``--results``: ``resources.csv``, ``soak.png``
(RSS per process and open streams over time), ``summary.json``, ``summary.md``, ``logs/``.
Exit status 0 when nothing was lost, duplicated, unexpected or out of order, no resume was answered
with a snapshot, the relays released every stream and channel, and (runs long enough to have a
warm-up) every relay and worker process kept its RSS within ``--rss-tolerance`` % after warm-up.
"""

from __future__ import annotations

if __name__ == "__main__":  # 2,000 streams in one process: cooperative sockets, sleeps, subprocess
    from gevent import monkey

    monkey.patch_all()

import argparse
import csv
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import redis  # noqa: E402
from loadtests.ledger import Check, Lineage, caught_up, check_lineage, fetch_logs  # noqa: E402
from loadtests.names import run_prefix, session_id, user_id  # noqa: E402
from loadtests.plot_png import Series, line_chart_png  # noqa: E402
from loadtests.relay_probe import read_gauges, rss_bytes  # noqa: E402
from loadtests.run_scenario import code_version, raise_nofile, uptime  # noqa: E402
from loadtests.sse_client import Frame, SSEConnection, StreamError  # noqa: E402
from tests.support.processes import ManagedProcess, start_relay, start_worker  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402

from rapidphoto_contract import keys  # noqa: E402
from rapidphoto_contract.tokens import mint_token  # noqa: E402

SESSION_PATH = "/api/upload/sessions/{}/stream"
RESULTS = ROOT / "loadtests" / "results" / "soak"
#: Photos per session must stay well under SESSION_LOG_MAXLEN (1,000, PROTOCOL §3): a trimmed log
#: would answer a resume with a snapshot, which this run counts as a failure.
MAX_PHOTOS_PER_SESSION = 900
#: The relays' settings: limits well above the run's, the default heartbeat.
RELAY_ENV = {
    "SSE_HEARTBEAT_SECONDS": "15",
    "RELAY_MAX_CONNECTIONS": "20000",
    "RELAY_MAX_CONNECTIONS_PER_USER": "64",
}
#: STREAM_CLOSED reasons after which a viewer resumes (PROTOCOL §5); any other one ends it.
RESUMABLE = frozenset({"shutdown", "slow-consumer"})
#: End phase bounds (seconds): the worker applies the last jobs and the viewers catch up; the
#: relays release every stream and channel once the viewers closed.
CATCH_UP_SECONDS = 60.0
RELEASE_SECONDS = 30.0


class Closing(Exception):
    """Raised in a viewer's greenlet at the end of the run: close politely and stop."""


@dataclass
class RelaySlot:
    name: str
    port: int
    proc: ManagedProcess
    started_at: float  # time.time() of the current process's start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Viewer:
    n: int
    lineage: Lineage
    relay: int
    connected_at_end: bool = False
    caught_up_at_end: bool = False


@dataclass
class Soak:
    args: argparse.Namespace
    out: Path
    redis_url: str
    relays: list[RelaySlot]
    worker: ManagedProcess
    redis_pid: int | None
    secret: str
    prefix: str = field(default_factory=run_prefix)
    viewers: list[Viewer] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    received: int = 0
    open_conns: int = 0
    published: dict[str, Any] = field(default_factory=dict)
    fatal: str | None = None
    phase: str = "setup"
    t0: float = 0.0  # time.time() at the publisher's launch
    load_end: float = 0.0  # the publisher sends nothing after this
    cpu_rows: list[dict[str, Any]] = field(default_factory=list)
    #: (process name, pid) -> its start, seconds from t0 (for the RSS warm-up).
    starts: dict[tuple[str, int], float] = field(default_factory=dict)
    publisher: subprocess.Popen[str] | None = None
    load_before: str = ""
    command: str = ""

    # --- viewers ---------------------------------------------------------------------------------

    def token(self, uid: str) -> str:
        token = self.tokens.get(uid)
        if token is None:
            # Valid well past the run: an expiring token would close streams (token-expired).
            ttl = self.args.duration + 3600
            token = self.tokens[uid] = mint_token(uid, key=self.secret, ttl_seconds=ttl)
        return token

    def view(self, viewer: Viewer) -> None:
        """Read, disconnect, resume on the other relay, until the run closes the viewer."""
        rng = random.Random(self.args.seed * 1_000_003 + viewer.n)
        try:
            while self.fatal is None:
                held = time.time() + rng.uniform(*self.args.segment) >= self.load_end
                until = None if held else time.time() + rng.uniform(*self.args.segment)
                abort = rng.random() < 0.5
                outcome = self.stream(viewer, until, abort)
                other = 1 - viewer.relay
                if outcome == "segment":
                    viewer.relay = other  # any instance resumes any stream (PROTOCOL §5)
                    gevent.sleep(rng.uniform(0.0, 1.0))
                elif outcome == "shutdown":
                    # Its relay is restarting: the other one, or the restarted one when back.
                    viewer.relay = rng.choice((viewer.relay, other))
                    gevent.sleep(rng.uniform(0.5, 3.0))
                elif outcome in ("unreachable", "dropped", "refused"):
                    viewer.relay = other
                    gevent.sleep(rng.uniform(0.5, 2.0))
                else:  # "ended": a STREAM_CLOSED this viewer must not resume from
                    return
        except Closing:
            return

    def stream(self, viewer: Viewer, until: float | None, abort: bool) -> str:
        """One connection of ``viewer``: how it ended (``segment``, ``shutdown``, ...)."""
        lineage = viewer.lineage
        relay = self.relays[viewer.relay]
        last_id = lineage.cursor()
        conn = SSEConnection(
            relay.url,
            SESSION_PATH.format(lineage.session_id),
            self.token(lineage.user_id),
            last_event_id=last_id,
            # Silent for two heartbeats and more: dead.
            read_timeout=int(RELAY_ENV["SSE_HEARTBEAT_SECONDS"]) * 2 + 10,
        )
        try:
            conn.open()
        except (StreamError, OSError) as exc:
            conn.close()
            status = getattr(exc, "status", None)
            if status is None:
                self.counts["connect failed (relay down)"] += 1
                return "unreachable"
            self.counts[f"HTTP {status}"] += 1
            lineage.errors.append(f"HTTP {status} on {relay.name}")
            return "refused"
        lineage.connections += 1
        lineage.reconnects += bool(last_id)
        self.counts["connections"] += 1
        self.counts["resumes (Last-Event-ID)"] += bool(last_id)
        lineage.connected = True
        self.open_conns += 1
        timer = gevent.Timeout(max(0.0, until - time.time())) if until is not None else None
        if timer is not None:
            timer.start()
        outcome = "dropped"
        try:
            for frame in conn.frames():
                ended = self.on_frame(lineage, conn, frame)
                if ended is not None:
                    outcome = ended
                    break
            else:
                self.counts["response ended without STREAM_CLOSED"] += 1
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.counts[
                "closed by the viewer (RST)" if abort else "closed by the viewer (FIN)"
            ] += 1
            outcome = "segment"
        except (StreamError, OSError) as exc:  # TimeoutError (silence) is an OSError
            self.counts[f"stream failed: {type(exc).__name__}"] += 1
        finally:
            if timer is not None:
                timer.close()
            lineage.connected = False
            self.open_conns -= 1
            conn.close(abort=abort and outcome == "segment")
        return outcome

    def on_frame(self, lineage: Lineage, conn: SSEConnection, frame: Frame) -> str | None:
        if frame.is_heartbeat:
            lineage.heartbeats += 1
            return None
        if frame.data is None:
            return None  # the retry: frame
        if frame.event == "SESSION_SNAPSHOT":
            lineage.record_snapshot(frame.id, resumed=conn.last_event_id is not None)
            return None
        if frame.event == "STREAM_CLOSED":
            reason = str((frame.json() or {}).get("reason"))
            self.counts[f"STREAM_CLOSED {reason}"] += 1
            if reason in RESUMABLE:
                return "shutdown"
            lineage.ended_by_relay = f"STREAM_CLOSED {reason}"
            lineage.errors.append(lineage.ended_by_relay)
            return "ended"
        if frame.id is None:
            lineage.errors.append(f"{frame.event} without an id")
            return None
        lineage.record_event(frame.id)
        self.received += 1
        return None

    # --- publisher, restarts, samples --------------------------------------------------------------

    def start_publisher(self) -> subprocess.Popen[str]:
        argv = [
            sys.executable,
            "-m",
            "loadtests.publisher",
            "--redis-url",
            self.redis_url,
            "--prefix",
            self.prefix,
            "--sessions",
            str(self.args.sessions),
            "--rate",
            str(self.args.rate),
            "--stop-at",
            str(self.load_end),
            "--seed",
            str(self.args.seed),
        ]
        return subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1
        )

    def read_publisher(self, proc: subprocess.Popen[str], ready: gevent.event.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("event")
            if kind == "ready":
                ready.set()
            elif kind in ("progress", "done"):
                self.published = message
            elif kind == "error":
                self.fatal = f"publisher: {message.get('message')}"
        if not ready.is_set():
            self.fatal = self.fatal or f"publisher exited with {proc.wait()} before it was ready"
            ready.set()

    def restart_relays(self) -> None:
        every = self.args.restart_every
        k = 1
        while every > 0 and self.t0 + k * every < self.load_end and self.fatal is None:
            gevent.sleep(max(0.0, self.t0 + k * every - time.time()))
            slot = self.relays[(k - 1) % len(self.relays)]
            old_pid, began = slot.proc.pid, time.time()
            slot.proc.signal(signal.SIGTERM)
            try:
                code: int | str = slot.proc.wait(20)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                code = "killed after 20 s"
            stopped = time.time()
            try:
                slot.proc = start_relay(
                    self.redis_url,
                    slot.port,
                    self.out / "logs",
                    slot.name,
                    True,
                    JWT_SECRET=self.secret,
                    **RELAY_ENV,
                )
            except (RuntimeError, TimeoutError) as exc:
                self.fatal = f"{slot.name} did not start again: {exc}"
                return
            slot.started_at = time.time()
            self.starts[(slot.name, slot.proc.pid)] = slot.started_at - self.t0
            self.restarts.append(
                {
                    "t_s": round(began - self.t0, 1),
                    "relay": slot.name,
                    "old_pid": old_pid,
                    "new_pid": slot.proc.pid,
                    "exit_code": code,
                    "stop_s": round(stopped - began, 2),
                    "start_s": round(slot.started_at - stopped, 2),
                }
            )
            print(f"soak: restarted {slot.name} at {began - self.t0:.0f} s", flush=True)
            k += 1

    def processes(self) -> list[tuple[str, int | None]]:
        procs: list[tuple[str, int | None]] = [
            (r.name, r.proc.pid if r.proc.running() else None) for r in self.relays
        ]
        procs.append(("worker", self.worker.pid if self.worker.running() else None))
        procs.append(("redis", self.redis_pid))
        procs.append(("client", os.getpid()))
        return procs

    def sample(self, writer: Any, file: TextIO, client: redis.Redis) -> dict[str, Any]:
        row: dict[str, Any] = {
            "t_s": round(time.time() - self.t0, 1),
            "phase": self.phase,
            "load1": os.getloadavg()[0],
        }
        for name, pid in self.processes():
            rss = rss_bytes(pid) if pid is not None else None
            row[f"{name}_pid"] = pid if rss is not None else ""
            row[f"{name}_rss_mb"] = round(rss / 2**20, 2) if rss is not None else ""
            row[f"{name}_fds"] = count_fds(pid) if rss is not None else ""
            row[f"{name}_cpu_s"] = cpu_seconds(pid) if rss is not None else ""
        for slot in self.relays:
            try:
                gauges = read_gauges(slot.url, timeout=5)
                streams: Any = int(gauges.open_streams)
                channels: Any = int(gauges.subscribed_channels)
            except OSError:  # restarting
                streams = channels = ""
            row[f"{slot.name}_streams"] = streams
            row[f"{slot.name}_channels"] = channels
        try:
            used = client.info("memory").get("used_memory", 0)
            row["redis_used_mb"] = round(int(used) / 2**20, 2)
        except redis.RedisError:
            row["redis_used_mb"] = ""
        row["published"] = self.published.get("sent", 0)
        row["received"] = self.received
        row["client_streams"] = self.open_conns
        row["restarts"] = len(self.restarts)
        writer.writerow(row)
        file.flush()
        self.cpu_rows.append(row)
        return row

    def sampler(self, writer: Any, file: TextIO, client: redis.Redis) -> None:
        every = self.args.sample_every
        k = 0
        while True:
            gevent.sleep(max(0.0, self.t0 + k * every - time.time()))
            self.sample(writer, file, client)
            k += 1

    # --- the end -----------------------------------------------------------------------------------

    def wait_applied(self, client: redis.Redis) -> dict[str, Any]:
        """Until the worker has appended every published event and every connected viewer has
        received its log's last entry (bounded by ``CATCH_UP_SECONDS``)."""
        want = self.args.sessions + int(self.published.get("sent", 0))
        sids = [session_id(self.prefix, k) for k in range(self.args.sessions)]
        deadline = time.time() + CATCH_UP_SECONDS
        logged = 0
        while time.time() < deadline:
            pipe = client.pipeline(transaction=False)
            for sid in sids:
                pipe.xlen(keys.session_log_key(sid))
            logged = sum(pipe.execute())
            if logged >= want:
                break
            gevent.sleep(0.5)
        logs = fetch_logs(client, sids)
        ends = {sid: (ids[-1] if ids else None) for sid, ids in logs.items()}
        # Every viewer still following its session (a viewer between two connections at the end
        # of the load is reconnecting: it is waited for too).
        while time.time() < deadline:
            behind = [
                v
                for v in self.viewers
                if v.lineage.ended_by_relay is None
                and not (v.lineage.connected and caught_up(v.lineage, ends[v.lineage.session_id]))
            ]
            if not behind:
                break
            gevent.sleep(0.2)
        for v in self.viewers:
            v.connected_at_end = v.lineage.connected
            v.caught_up_at_end = v.connected_at_end and caught_up(
                v.lineage, ends[v.lineage.session_id]
            )
        return {"log_entries_expected": want, "log_entries": logged}

    def wait_released(self) -> tuple[list[dict[str, Any]], float]:
        """Each relay's open streams and subscribed channels, waited until all are 0."""
        started = time.time()
        deadline = started + RELEASE_SECONDS
        while True:
            values = []
            for slot in self.relays:
                try:
                    g = read_gauges(slot.url, timeout=5)
                    values.append(
                        {
                            "relay": slot.name,
                            "open_streams": int(g.open_streams),
                            "subscribed_channels": int(g.subscribed_channels),
                        }
                    )
                except OSError as exc:
                    values.append({"relay": slot.name, "error": str(exc)})
            done = all(v.get("open_streams") == 0 == v.get("subscribed_channels") for v in values)
            if done or time.time() > deadline:
                return values, round(time.time() - started, 1)
            gevent.sleep(0.5)


def count_fds(pid: int | None) -> int | str:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return ""


def cpu_seconds(pid: int | None) -> float | str:
    """User + system CPU time of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return ""


def rss_growth(
    rows: list[dict[str, Any]],
    names: list[str],
    warmup: float,
    starts: dict[tuple[str, int], float],
) -> list[dict[str, Any]]:
    """RSS growth of each process (each relay restart is a new process) after its warm-up.

    Per process: the samples of the run phase taken ``warmup`` seconds or more after it started;
    growth = median of the last 3 minus median of the first 3, over the first (needs 6 samples).
    """
    out = []
    for name in names:
        by_pid: dict[int, list[tuple[float, float]]] = {}
        for row in rows:
            pid, rss = row.get(f"{name}_pid"), row.get(f"{name}_rss_mb")
            if row["phase"] == "run" and pid not in ("", None) and rss not in ("", None):
                by_pid.setdefault(int(pid), []).append((float(row["t_s"]), float(rss)))
        for pid, samples in by_pid.items():
            born = starts.get((name, pid), 0.0)
            kept = [rss for t, rss in samples if t >= born + warmup]
            item: dict[str, Any] = {
                "process": name,
                "pid": pid,
                "started_s": round(born, 1),
                "samples_after_warmup": len(kept),
                "rss_min_mb": min(r for _, r in samples),
                "rss_max_mb": max(r for _, r in samples),
            }
            if len(kept) >= 6:
                first, last = statistics.median(kept[:3]), statistics.median(kept[-3:])
                item.update(
                    rss_after_warmup_mb=round(first, 1),
                    rss_end_mb=round(last, 1),
                    growth_pct=round((last - first) / first * 100, 2),
                )
            out.append(item)
    return out


def plot(rows: list[dict[str, Any]], restarts: list[dict[str, Any]], path: Path) -> None:
    times = [float(r["t_s"]) / 60 for r in rows]

    def series(column: str, label: str) -> Series:
        points = [
            (t, float(r[column]))
            for t, r in zip(times, rows, strict=True)
            if r.get(column) not in ("", None)
        ]
        return Series(label, points)

    rss = [
        series(f"{n}_rss_mb", n.upper())
        for n in ("relay-1", "relay-2", "worker", "redis", "client")
    ]
    streams = [
        series("relay-1_streams", "RELAY-1"),
        series("relay-2_streams", "RELAY-2"),
        series("client_streams", "CLIENT (OPEN)"),
    ]
    marks = [float(r["t_s"]) / 60 for r in restarts]
    path.write_bytes(
        line_chart_png(
            [("RSS (MB) PER PROCESS", rss), ("OPEN STREAMS", streams)],
            x_label="MINUTES (DASHED: RELAY RESTART)",
            marks=marks,
        )
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load (≤ 3600)")
    parser.add_argument("--rate", type=float, default=50.0, help="photo outcomes per second")
    parser.add_argument("--streams", type=int, default=2000, help="concurrent viewers")
    parser.add_argument("--sessions", type=int, help="default: streams / 4")
    parser.add_argument(
        "--restart-every",
        type=float,
        default=600.0,
        help="seconds between relay restarts (0: none)",
    )
    parser.add_argument(
        "--segment",
        type=float,
        nargs=2,
        default=(20.0, 90.0),
        metavar=("MIN", "MAX"),
        help="seconds a viewer reads before it disconnects and resumes",
    )
    parser.add_argument("--spawn-rate", type=float, default=200.0, help="viewers opened per s")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, help="seconds (default: restart period + 120, else duration / 5)"
    )
    parser.add_argument("--rss-tolerance", type=float, default=5.0, help="%% after warm-up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.sessions = args.sessions or max(1, args.streams // 4)
    if not 0 < args.duration <= 3600:
        parser.error("--duration must be in (0, 3600]: every load loop is bounded")
    if not 0 < args.segment[0] <= args.segment[1]:
        parser.error("--segment MIN MAX: 0 < MIN <= MAX")
    per_session = args.rate * args.duration / args.sessions + 2
    if per_session > MAX_PHOTOS_PER_SESSION:
        parser.error(
            f"{per_session:.0f} photos per session would trim the session logs: more --sessions"
        )
    if args.warmup is None:
        args.warmup = args.restart_every + 120 if args.restart_every > 0 else args.duration / 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.results.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    load_before, version = uptime(), code_version()
    command = "python loadtests/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"soak: open files {nofile}; load before: {load_before}", flush=True)
    secret = os.urandom(24).hex()
    server = RedisServer()
    server.start()
    procs: list[ManagedProcess] = []
    soak: Soak | None = None
    try:
        worker = start_worker(server.url, out / "logs")  # not waited for: ready with the relays
        procs.append(worker)
        ports = [free_port() for _ in range(2)]
        starting = [  # both at once (cooperative waits): less set-up time
            gevent.spawn(
                start_relay,
                server.url,
                port,
                out / "logs",
                f"relay-{n}",
                True,
                JWT_SECRET=secret,
                **RELAY_ENV,
            )
            for n, port in enumerate(ports, start=1)
        ]
        gevent.joinall(starting, raise_error=True)
        procs.extend(g.value for g in starting)
        relays = [
            RelaySlot(f"relay-{n}", port, g.value, time.time())
            for n, (port, g) in enumerate(zip(ports, starting, strict=True), start=1)
        ]
        assert server.proc is not None
        soak = Soak(args, out, server.url, relays, worker, server.proc.pid, secret)
        soak.load_before, soak.command = load_before, command
        return run(soak)
    finally:
        if soak is not None and soak.publisher is not None and soak.publisher.poll() is None:
            soak.publisher.terminate()
            soak.publisher.wait(10)
        if soak is not None:
            procs.extend(slot.proc for slot in soak.relays)  # restarted ones too
        # All at once (cooperative waits); stopping one already stopped is a no-op.
        gevent.joinall([gevent.spawn(p.stop) for p in procs], timeout=30)
        server.stop()
        print(f"soak: load after: {uptime()}; before: {load_before}; code {version}", flush=True)


def run(soak: Soak) -> int:
    args, out = soak.args, soak.out
    client = redis.Redis.from_url(soak.redis_url, socket_timeout=30)
    soak.t0 = time.time()
    soak.load_end = soak.t0 + args.duration
    soak.phase = "run"
    for r in soak.relays:
        soak.starts[(r.name, r.proc.pid)] = r.started_at - soak.t0
    soak.starts[("worker", soak.worker.pid)] = 0.0
    publisher = soak.publisher = soak.start_publisher()
    print(f"soak: load for {args.duration:g} s", flush=True)
    ready = gevent.event.Event()
    gevent.spawn(soak.read_publisher, publisher, ready)
    csv_file = (out / "resources.csv").open("w", newline="")
    names = [r.name for r in soak.relays] + ["worker", "redis", "client"]
    columns = ["t_s", "phase", "load1"]
    for name in names:
        columns += [f"{name}_pid", f"{name}_rss_mb", f"{name}_fds", f"{name}_cpu_s"]
    for r in soak.relays:
        columns += [f"{r.name}_streams", f"{r.name}_channels"]
    columns += ["redis_used_mb", "published", "received", "client_streams", "restarts"]
    writer = csv.DictWriter(csv_file, fieldnames=columns)
    writer.writeheader()
    sampler = gevent.spawn(soak.sampler, writer, csv_file, client)
    ready.wait(timeout=120)
    greenlets = []
    if soak.fatal is None:
        restarter = gevent.spawn(soak.restart_relays)
        for n in range(args.streams):
            k = n % args.sessions
            lineage = Lineage(session_id(soak.prefix, k), user_id(soak.prefix, k))
            viewer = Viewer(n, lineage, relay=n % len(soak.relays))
            soak.viewers.append(viewer)
            greenlets.append(gevent.spawn(soak.view, viewer))
            gevent.sleep(1 / args.spawn_rate)
        while time.time() < soak.load_end and soak.fatal is None:
            gevent.sleep(1)
        restarter.join(timeout=60)
    publisher.wait(timeout=60)
    soak.phase = "drain"
    drain_started = time.time()
    applied = soak.wait_applied(client)
    applied["catch_up_s"] = round(time.time() - drain_started, 1)
    soak.phase = "closed"
    gevent.killall(greenlets, exception=Closing, timeout=30)
    released, release_s = soak.wait_released()
    print(f"soak: caught up in {applied['catch_up_s']} s, released in {release_s} s", flush=True)
    sampler.kill()
    final_row = soak.sample(writer, csv_file, client)
    csv_file.close()

    # Every delivery against the logs.
    logs = fetch_logs(client, {v.lineage.session_id for v in soak.viewers})
    total = Check()
    resyncs = errors = 0
    not_at_end = 0
    for v in soak.viewers:
        ids = logs.get(v.lineage.session_id, [])
        total.add(check_lineage(v.lineage, ids, to_end=v.connected_at_end))
        resyncs += v.lineage.resyncs
        errors += len(v.lineage.errors)
        not_at_end += not v.caught_up_at_end
    client.close()

    rows = soak.cpu_rows
    growth = rss_growth(rows, names, args.warmup, soak.starts)
    ruled = [g for g in growth if g["process"] != "redis" and g["process"] != "client"]
    measured = [g for g in ruled if "growth_pct" in g]
    worst = max((abs(g["growth_pct"]) for g in measured), default=None)
    streams_end = sum(v.get("open_streams", 1) for v in released)
    channels_end = sum(v.get("subscribed_channels", 1) for v in released)
    load_after = uptime()
    figures: dict[str, Any] = {
        "duration_s": args.duration,
        "rate": args.rate,
        "streams": args.streams,
        "sessions": args.sessions,
        "restart_every_s": args.restart_every,
        "warmup_s": args.warmup,
        "published": soak.published,
        **applied,
        "events_expected": total.expected,
        "events_received": total.received,
        "lost": total.lost,
        "duplicated": total.duplicates,
        "unexpected": total.unexpected,
        "out_of_order": total.out_of_order,
        "resyncs": resyncs,
        "viewer_errors": errors,
        "viewers_not_caught_up_at_end": not_at_end,
        "connections": soak.counts,
        "relay_restarts": soak.restarts,
        "streams_at_end": streams_end,
        "channels_at_end": channels_end,
        "released": released,
        "release_wait_s": release_s,
        "rss_growth": growth,
        "rss_growth_worst_pct": worst,
        "final_sample": final_row,
        "command": soak.command,
        "load_before": soak.load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
        "code": code_version(),
        "fatal": soak.fatal,
    }
    checks = [
        ("no fatal error", soak.fatal is None, str(soak.fatal)),
        ("events delivered", total.received > 0, f"{total.received} received"),
        ("0 lost", total.lost == 0, str(total.lost)),
        ("0 duplicated", total.duplicates == 0, str(total.duplicates)),
        ("0 unexpected", total.unexpected == 0, str(total.unexpected)),
        ("per-session order", total.out_of_order == 0, f"{total.out_of_order} out of order"),
        ("0 resyncs", resyncs == 0, f"{resyncs} snapshot(s) answered to Last-Event-ID"),
        ("all viewers caught up at the end", not_at_end == 0, f"{not_at_end} not"),
        ("streams back to 0", streams_end == 0, json.dumps(released)),
        ("channels back to 0", channels_end == 0, json.dumps(released)),
        (
            "every restart done",
            len(soak.restarts) == expected_restarts(args),
            f"{len(soak.restarts)} of {expected_restarts(args)}",
        ),
    ]
    if measured:
        checks.append(
            (
                f"RSS within {args.rss_tolerance:g} % after warm-up (relays, worker)",
                worst is not None and worst <= args.rss_tolerance,
                f"worst {worst} % over {len(measured)} process(es)",
            )
        )
    passed = all(ok for _, ok, _ in checks)
    figures["checks"] = [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks]
    figures["passed"] = passed
    (out / "summary.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    try:
        plot(rows, soak.restarts, out / "soak.png")
    except Exception as exc:  # the figures matter more than the picture
        print(f"soak: plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    (out / "summary.md").write_text(summary_md(figures, checks, growth))
    print(summary_md(figures, checks, growth), flush=True)
    return 0 if passed else 1


def expected_restarts(args: argparse.Namespace) -> int:
    if args.restart_every <= 0:
        return 0
    return max(0, math.ceil(float(args.duration) / float(args.restart_every)) - 1)


def summary_md(
    f: dict[str, Any], checks: list[tuple[str, bool, str]], growth: list[dict[str, Any]]
) -> str:
    lines = [
        "# Soak",
        "",
        f"{f['duration_s']:g} s, {f['rate']:g} photos/s, {f['streams']} streams over "
        f"{f['sessions']} sessions, 2 relays (one restarted every {f['restart_every_s']:g} s), "
        f"1 worker, a private Redis. Code: {f['code']}.",
        "",
        f"Command: `.tools/bin/uv run {f['command']}`",
        "",
        f"Machine: {f['cpus']} CPU(s), shared; load before: `{f['load_before']}`; "
        f"after: `{f['load_after']}`.",
        "",
        f"Published {f['published'].get('sent', 0)} photo outcomes "
        f"({f['published'].get('rate', 0)}/s); log entries {f['log_entries']} of "
        f"{f['log_entries_expected']}. Deliveries checked: {f['events_received']} received, "
        f"{f['events_expected']} expected.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| lost | {f['lost']} |",
        f"| duplicated | {f['duplicated']} |",
        f"| unexpected | {f['unexpected']} |",
        f"| out of order | {f['out_of_order']} |",
        f"| snapshots answered to Last-Event-ID | {f['resyncs']} |",
        f"| relay restarts | {len(f['relay_restarts'])} |",
        f"| RSS growth after warm-up ({f['warmup_s']:g} s), worst relay/worker | "
        f"{f['rss_growth_worst_pct']} % |",
        f"| open streams at the end (both relays) | {f['streams_at_end']} |",
        f"| subscribed channels at the end (both relays) | {f['channels_at_end']} |",
        "",
        "## Checks",
        "",
        *(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in checks),
        "",
        "## RSS per process (each relay restart is a new process)",
        "",
        "| process | pid | started (s) | min / max MB | after warm-up MB | end MB | growth % |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {g['process']} | {g['pid']} | {g['started_s']} | {g['rss_min_mb']} / "
            f"{g['rss_max_mb']} | {g.get('rss_after_warmup_mb', '—')} | "
            f"{g.get('rss_end_mb', '—')} | {g.get('growth_pct', '—')} |"
            for g in growth
        ),
        "",
        "Redis' RSS grows with its data by design (the session logs: "
        f"{f['log_entries']} entries); it is not held to the RSS rule.",
        "",
        "## Connections",
        "",
        *(f"- {k}: {v}" for k, v in sorted(f["connections"].items())),
        "",
        "## Relay restarts",
        "",
        *(
            f"- {r['t_s']} s: {r['relay']} pid {r['old_pid']} -> {r['new_pid']}, exit "
            f"{r['exit_code']}, stopped in {r['stop_s']} s, ready again in {r['start_s']} s"
            for r in f["relay_restarts"]
        ),
        "",
        f"RESULT: {'PASS' if f['passed'] else 'FAIL'}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
