"""The browser module (/client/rapidphoto-realtime.js, PROTOCOL §5 and §5.1) in headless Chromium,
imported from a real relay by a test page on the relay's origin and run against real relays and a
real worker: its SSE parser, every refusal (400/401/403), 429/503 with ``Retry-After``, 204, a
session closed alone (``SESSION_CLOSED``), resumption with its cursor after the relay dies, and
cookie authentication. The page records every event the module emits in ``window.runs``; the tests
read that record, the requests the browser made, and what the worker wrote in Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, Request, Route
from playwright.async_api import TimeoutError as PlaywrightTimeout

from rapidphoto_tools.client import UploadJobsClient
from tests.conftest import CPU_HEAVY
from tests.e2e.conftest import (
    NOTIFICATION_STREAM,
    Cluster,
    RelayInstance,
    Truth,
    drive,
    fresh,
    running,
)
from tests.support.browser import CLIENT_MODULE_PATH
from tests.support.sse import open_sse

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), CPU_HEAVY]

MULTI_STREAM = "/api/upload/sessions/stream"
RETRY_MS = 1500  # the relays' SSE_RETRY_MS: not the module's default (2000), so `retry:` shows
TEST_PAGE = "/__module_test__"
#: An application's origin, served by the browser itself (Playwright; nothing listens on port 1),
#: listed in the relays' RELAY_CORS_ORIGINS.
APP_ORIGIN = "http://localhost:1"


HARNESS = """<!doctype html><meta charset="utf-8"><title>module test</title>
<script type="module">
import * as realtime from "MODULE_URL";
const EVENTS = ["connection", "frame", "progress", "sessionclosed", "notification", "duplicate"];
function plain(on, d) {
  if (on === "progress") {
    const s = d.session;
    return { sessionId: d.sessionId, type: d.event.type, eventId: d.event.eventId ?? null,
      uploaded: s.uploadedPhotos, failed: s.failedPhotos, total: s.totalPhotos, status: s.status,
      failures: Object.fromEntries(s.failures) };
  }
  if (on === "sessionclosed") return { sessionId: d.sessionId, reason: d.reason };
  if (on === "notification") return { eventId: d.eventId, kind: d.notification.kind,
    sessionId: d.notification.sessionId };
  if (on === "frame") return { type: d.type, id: d.id, lastEventId: d.lastEventId, json: d.json };
  return { ...d };
}
window.realtime = realtime;
window.runs = {};
window.streams = {};
window.watch = (name, options) => {
  const log = window.runs[name] = [];
  const stream = window.streams[name] = new realtime.UploadProgressStream(options);
  for (const on of EVENTS) stream.on(on, (d) => log.push({ on, at: performance.now(), ...plain(on, d) }));
  stream.start();
};
window.ready = true;
</script>"""


def harness(module_url: str) -> str:
    """The test page: imports the module as any page would, and records what it emits."""
    return HARNESS.replace("MODULE_URL", module_url)


@pytest.fixture(scope="module")
def stack(module_cluster_factory: Callable[[], Cluster]) -> Cluster:
    """A worker and two relays: ``main`` allows one stream per user; ``full`` one stream in all."""
    return module_cluster_factory().start(
        relays=2,
        SSE_RETRY_MS=str(RETRY_MS),
        RELAY_CORS_ORIGINS=APP_ORIGIN,
        each=[{"RELAY_MAX_CONNECTIONS_PER_USER": "1"}, {"RELAY_MAX_CONNECTIONS": "1"}],
    )


class ModulePage:
    """The test page on a relay's origin, with the module loaded, and the stream requests made."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[tuple[float, Request]] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "request",
            lambda r: (
                self.requests.append((time.monotonic(), r)) if MULTI_STREAM in r.url else None
            ),
        )

    @classmethod
    async def open(
        cls, context: BrowserContext, relay: RelayInstance, origin: str | None = None
    ) -> ModulePage:
        """The test page on ``origin`` (the relay's own by default), importing the relay's module."""
        body = harness(relay.base_url + CLIENT_MODULE_PATH)

        async def serve(route: Route) -> None:
            await route.fulfill(status=200, content_type="text/html", body=body)

        url = (origin or relay.base_url) + TEST_PAGE
        page = await context.new_page()
        await page.route(url, serve)
        module_page = cls(page)
        await page.goto(url)
        await page.wait_for_function("() => window.ready === true", timeout=10_000)
        return module_page

    async def watch(self, name: str, **options: Any) -> None:
        await self.page.evaluate(
            "([name, options]) => window.watch(name, options)", [name, options]
        )

    async def log(self, name: str, on: str | None = None) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = await self.page.evaluate("(n) => window.runs[n]", name)
        return [e for e in entries if on is None or e["on"] == on]

    async def states(self, name: str) -> list[tuple[str, int]]:
        return [(e["state"], e["status"]) for e in await self.log(name, "connection")]

    async def wait(self, what: str, expression: str, arg: Any = None, within: float = 20) -> None:
        try:
            await self.page.wait_for_function(expression, arg=arg, timeout=within * 1000)
        except PlaywrightTimeout:
            runs = await self.page.evaluate(
                "() => Object.fromEntries(Object.entries(window.runs).map(([k, v]) => "
                "[k, v.filter((e) => e.on === 'connection')]))"
            )
            raise AssertionError(
                f"module page: timed out after {within} s waiting for {what}; "
                f"connection events: {runs}; errors: {self.errors}"
            ) from None

    async def wait_state(self, name: str, state: str, within: float = 20) -> dict[str, Any]:
        await self.wait(
            f"{name} {state}",
            "([n, s]) => (window.runs[n] || []).some((e) => e.on === 'connection' && e.state === s)",
            [name, state],
            within,
        )
        return next(e for e in await self.log(name, "connection") if e["state"] == state)

    async def wait_count(self, name: str, on: str, count: int, within: float = 20) -> None:
        await self.wait(
            f"{count} {on} on {name}",
            "([n, on, c]) => (window.runs[n] || []).filter((e) => e.on === on).length >= c",
            [name, on, count],
            within,
        )

    async def stopped_for_good(self, name: str) -> bool:
        stopped: bool = await self.page.evaluate(
            "(n) => !window.streams[n].running && window.streams[n].timer === null", name
        )
        return stopped

    def requests_of(self, session: str) -> list[tuple[float, Request]]:
        return [(at, r) for at, r in self.requests if f"session={session}" in r.url]


async def test_sse_parser_follows_the_whatwg_rules(stack: Cluster, browser: BrowserContext) -> None:
    """Field parsing split anywhere across chunks: CR, LF and CRLF line ends (a CRLF split between
    two chunks is one line end), comments, multi-line data, an `id:` that persists and one that
    resets it, an event without data (not dispatched), a bad `retry:` (ignored)."""
    page = await ModulePage.open(browser, stack.relays[0])
    got = await page.page.evaluate(
        """() => {
            const out = [];
            const parser = new window.realtime.SSEParser({
                onEvent: (f) => out.push(["event", f.type, f.data, f.id, f.lastEventId]),
                onRetry: (ms) => out.push(["retry", ms]),
                onComment: (c) => out.push(["comment", c]),
            }, "start");
            const text = "retry: 1500\\r\\n\\r\\n: heartbeat\\n\\nid: c1\\nevent: A\\ndata: {\\"x\\":1}\\n\\n"
                + "data: one\\rdata:two\\r\\n\\r" + "event: B\\nid: c2\\n\\n" + "data: no type\\n\\n"
                + "retry: soon\\nid\\ndata: reset\\n\\n" + "data: unterminated";
            for (let i = 0; i < text.length; i += 3) parser.feed(text.slice(i, i + 3));
            return out;
        }"""
    )
    assert got == [
        ["retry", 1500],
        ["comment", "heartbeat"],
        ["event", "A", '{"x":1}', "c1", "c1"],
        ["event", "message", "one\ntwo", None, "c1"],
        ["event", "message", "no type", None, "c2"],
        ["event", "message", "reset", "", ""],
    ]
    assert page.errors == []


async def test_refusals_stop_for_good_and_say_why(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """400, 401, 403: final, with the status and the relay's message, one request each, and no
    retry pending. The token goes in the Authorization header, never in the URL."""
    relay = stack.relays[0]
    user, other = fresh("u"), fresh("other")
    mine, theirs = fresh("mine"), fresh("theirs")
    await module_jobs.start_upload_session(mine, user, total_photos=1)
    await module_jobs.start_upload_session(theirs, other, total_photos=1)
    await module_truth.wait_status(theirs, "IN_PROGRESS")
    token = stack.token(user)
    page = await ModulePage.open(browser, relay)
    too_many = [fresh("s") for _ in range(33)]
    cases: dict[str, tuple[dict[str, Any], int, str]] = {
        "no-token": ({"sessions": [mine]}, 401, "refused (401)"),
        "expired": ({"sessions": [mine], "token": stack.token(user, ttl=-60)}, 401, "expired"),
        "bad-id": ({"sessions": [mine, "not.an.id"], "token": token}, 400, "every session"),
        "too-many": ({"sessions": too_many, "token": token}, 400, "at most 32 sessions"),
        "foreign": ({"sessions": [mine, theirs], "token": token}, 403, "another user"),
    }
    for name, (options, _, _) in cases.items():
        await page.watch(name, **options)
    for name, (_, status, text) in cases.items():
        stopped = await page.wait_state(name, "error")
        assert stopped["status"] == status, (name, stopped)
        assert text in f"{stopped['reason']} {stopped['message']}", (name, stopped)
        assert stopped["reason"].startswith(f"refused ({status})")
        assert await page.states(name) == [("connecting", 0), ("error", status)]
        assert await page.stopped_for_good(name)
    assert len(page.requests) == len(cases)  # one request each, no retry
    for _, request in page.requests:
        assert "access_token" not in request.url
    with_token = [r for _, r in page.requests if "authorization" in r.headers]
    assert len(with_token) == len(cases) - 1  # all but "no-token"
    assert all(r.headers["authorization"].startswith("Bearer ") for r in with_token)
    assert page.errors == []


async def test_busy_relays_are_retried_after_retry_after(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """429 (the user's one stream is taken) and 503 (the relay's one stream is taken): the module
    waits ``Retry-After`` between attempts, and connects once a slot is free."""
    main, full = stack.relays
    busy_user, crowded_user, someone = fresh("busy"), fresh("crowded"), fresh("someone")
    busy, crowded = fresh("s"), fresh("s")
    await module_jobs.start_upload_session(busy, busy_user, total_photos=1)
    await module_jobs.start_upload_session(crowded, crowded_user, total_photos=1)
    await module_truth.wait_status(crowded, "IN_PROGRESS")
    async with (
        open_sse(main.base_url, NOTIFICATION_STREAM, token=stack.token(busy_user)) as held_1,
        open_sse(full.base_url, NOTIFICATION_STREAM, token=stack.token(someone)) as held_2,
    ):
        assert held_1.status_code == held_2.status_code == 200
        # Each on a test page of its relay's origin (the relays allow no other origin).
        pages = {
            "busy": await ModulePage.open(browser, main),
            "crowded": await ModulePage.open(browser, full),
        }
        await pages["busy"].watch("busy", sessions=[busy], token=stack.token(busy_user))
        await pages["crowded"].watch("crowded", sessions=[crowded], token=stack.token(crowded_user))
        await pages["busy"].wait_count("busy", "connection", 4)  # connecting + 3 refusals
        await pages["crowded"].wait_count("crowded", "connection", 3)
    for name, session, status in (("busy", busy, 429), ("crowded", crowded, 503)):
        page = pages[name]
        refusals = [e for e in await page.log(name, "connection") if e["status"] == status]
        assert len(refusals) >= 2, (name, refusals)
        for refusal in refusals:
            assert refusal["state"] == "reconnecting"
            assert refusal["reason"] == f"relay answered {status}"
            # Retry-After: ceil(SSE_RETRY_MS / 1000) = 2 s for a user over their limit; plus 0
            # to 2 s at random for a full relay (PROTOCOL §5 "Limits and Retry-After").
            assert refusal["retryInMs"] in ((2000,) if status == 429 else (2000, 3000, 4000))
        attempts = [at for at, _ in page.requests_of(session)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        assert gaps
        assert min(gaps) >= 1.9, gaps  # never before Retry-After
    # Both held streams are closed: each stream gets in at its next attempt.
    for name, session in (("busy", busy), ("crowded", crowded)):
        page = pages[name]
        await page.wait_state(name, "open", within=15)
        await page.wait_count(name, "progress", 1)
        snapshot = (await page.log(name, "progress"))[0]
        assert (snapshot["type"], snapshot["sessionId"], snapshot["total"]) == (
            "SESSION_SNAPSHOT",
            session,
            1,
        )
        assert page.errors == []


async def test_completed_sessions_close_the_stream_and_a_caught_up_cursor_gets_204(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """Two completed sessions: their snapshots, then STREAM_CLOSED completed, and the stream stops
    (`closed`). Resumed from its last cursor, the relay answers 204: `closed`, nothing received.
    The resumed stream authenticates with the relay's cookie instead of a token."""
    relay = stack.relays[0]
    user = fresh("u")
    first, second = fresh("a"), fresh("b")
    await module_jobs.start_upload_session(first, user, total_photos=2)
    await module_jobs.start_upload_session(second, user, total_photos=1)
    await module_jobs.complete_photo_upload(first, "p1")
    await module_jobs.fail_photo_upload(first, "p2", "corrupt file")
    await module_jobs.complete_photo_upload(second, "q1")
    await module_truth.wait_status(first, "COMPLETED")
    await module_truth.wait_status(second, "COMPLETED")
    page = await ModulePage.open(browser, relay)

    await page.watch("done", sessions=[first, second], token=stack.token(user))
    closed = await page.wait_state("done", "closed")
    assert (closed["reason"], closed["status"]) == ("completed", 0)
    progress = await page.log("done", "progress")
    assert [(p["type"], p["sessionId"], p["status"]) for p in progress] == [
        ("SESSION_SNAPSHOT", first, "COMPLETED"),
        ("SESSION_SNAPSHOT", second, "COMPLETED"),
    ]
    assert (progress[0]["uploaded"], progress[0]["failed"]) == (1, 1)
    assert progress[0]["failures"] == {"p2": "corrupt file"}
    frames = await page.log("done", "frame")
    assert frames[-1]["type"] == "STREAM_CLOSED"
    assert frames[-1]["json"]["reason"] == "completed"
    cursor: str = await page.page.evaluate("() => window.streams.done.lastEventId")
    assert cursor

    await browser.add_cookies(
        [{"name": "access_token", "value": stack.token(user), "url": relay.base_url}]
    )
    await page.watch("again", sessions=[first, second], lastEventId=cursor)
    closed = await page.wait_state("again", "closed")
    assert (closed["reason"], closed["status"]) == ("completed", 204)
    assert await page.log("again", "frame") == []
    resumed = page.requests[-1][1]
    assert resumed.headers.get("last-event-id") == cursor
    assert "authorization" not in resumed.headers
    assert await page.stopped_for_good("again")
    assert page.errors == []


async def test_resumes_with_its_cursor_and_a_session_closed_alone(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """One stream for two sessions: the second appears with another owner (SESSION_CLOSED
    forbidden), the first goes on. Photos keep coming while the relay is SIGTERMed (STREAM_CLOSED
    shutdown) and restarted: the module waits the stream's `retry:`, resumes with the cursor of
    the last frame it received, and applies exactly the log, once; when the first session
    completes, every session is completed or closed and the stream closes as completed.
    (A relay SIGKILLed under the page is in test_browser.py.)"""
    jobs, truth = module_jobs, module_truth
    user, other = fresh("u"), fresh("other")
    session, squatted = fresh("s"), fresh("squatted")
    total = 40
    await jobs.start_upload_session(session, user, total_photos=total)
    await truth.wait_status(session, "IN_PROGRESS")
    relay = stack.relays[0]
    page = await ModulePage.open(browser, relay)
    await page.watch("run", sessions=[session, squatted], token=stack.token(user))
    await page.wait_count("run", "progress", 1)
    await jobs.start_upload_session(squatted, other, total_photos=1)
    await page.wait_count("run", "sessionclosed", 1)
    closed_alone = (await page.log("run", "sessionclosed"))[0]
    assert (closed_alone["sessionId"], closed_alone["reason"]) == (squatted, "forbidden")

    async with running(drive(jobs, session, total, every=0.08)) as driving:
        await page.wait_count("run", "progress", 8)
        relay.proc.signal(signal.SIGTERM)
        await asyncio.to_thread(relay.proc.wait, 10)
        relay = await asyncio.to_thread(stack.restart_relay, relay)
        failed = await asyncio.wait_for(driving, 60)
    closed = await page.wait_state("run", "closed", within=30)
    assert closed["reason"] == "completed"

    shutdown = [e for e in await page.log("run", "connection") if e["reason"] == "shutdown"]
    assert len(shutdown) == 1
    assert shutdown[0]["retryInMs"] == RETRY_MS  # the relay's `retry:`, not the module's default
    closes = [
        f["json"]["reason"] for f in await page.log("run", "frame") if f["type"] == "STREAM_CLOSED"
    ]
    assert closes == ["shutdown", "completed"]
    log = await truth.log(session)
    progress = [p for p in await page.log("run", "progress") if p["sessionId"] == session]
    assert [p["eventId"] for p in progress] == [e.id for e in log]  # nothing lost, none twice
    assert [p["type"] for p in progress].count("SESSION_SNAPSHOT") == 1
    last = progress[-1]
    assert (last["uploaded"], last["failed"], last["status"]) == (
        total - len(failed),
        len(failed),
        "COMPLETED",
    )
    assert last["failures"] == await truth.failures(session)
    assert await page.log("run", "duplicate") == []
    # Every attempt after the first carried the cursor of the last frame received before it.
    requests = [r for _, r in page.requests_of(session)]
    assert len(requests) >= 2
    assert "last-event-id" not in requests[0].headers
    cursors = {f["lastEventId"] for f in await page.log("run", "frame")}
    assert all(r.headers.get("last-event-id") in cursors for r in requests[1:])
    # The closed session stayed closed across the reconnection.
    assert all(p["sessionId"] == session for p in await page.log("run", "progress"))
    assert page.errors == []


async def test_a_silent_stream_counts_as_dead_and_is_resumed(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """No byte for ``idleTimeoutMs`` (here 1 s, under the relay's 15 s heartbeat: as if the
    connection had died silently): the module drops the connection and resumes with its cursor."""
    user, session = fresh("u"), fresh("quiet")
    await module_jobs.start_upload_session(session, user, total_photos=2)
    await module_truth.wait_status(session, "IN_PROGRESS")
    page = await ModulePage.open(browser, stack.relays[0])
    await page.watch("quiet", sessions=[session], token=stack.token(user), idleTimeoutMs=1000)
    await page.wait(
        "a reconnection for silence",
        """() => window.runs.quiet.some((e) => e.on === "connection" && e.reason === "no heartbeat")""",
    )
    await page.wait_count("quiet", "connection", 4)  # connecting, open, reconnecting, ...
    await module_jobs.complete_photo_upload(session, "a")
    await module_jobs.complete_photo_upload(session, "b")
    closed = await page.wait_state("quiet", "closed", within=20)
    assert closed["reason"] == "completed"
    progress = await page.log("quiet", "progress")
    assert [p["eventId"] for p in progress] == [e.id for e in await module_truth.log(session)]
    requests = [r for _, r in page.requests_of(session)]
    assert len(requests) >= 2
    assert all(r.headers.get("last-event-id") for r in requests[1:])
    assert page.errors == []


async def test_a_page_of_another_origin_imports_the_module_and_streams(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """README's usage: a page of the application's own origin imports the module from the relay
    (a module script, fetched with CORS and no credentials: the relay allows any origin for it)
    and holds a stream there with its token (a CORS request with `Authorization` and
    `Last-Event-ID`: the relay lists the page's origin in RELAY_CORS_ORIGINS)."""
    relay = stack.relays[0]
    user, session = fresh("u"), fresh("s")
    await module_jobs.start_upload_session(session, user, total_photos=2)
    await module_truth.wait_status(session, "IN_PROGRESS")
    # Chromium lets a page reach a loopback address (the test's relay) only with this permission;
    # an application and a relay on public hosts need none.
    await browser.grant_permissions(["local-network-access"])
    page = await ModulePage.open(browser, relay, origin=APP_ORIGIN)
    assert await page.page.evaluate("() => location.origin") == APP_ORIGIN
    await page.watch("remote", sessions=[session], token=stack.token(user), baseUrl=relay.base_url)
    await page.wait_count("remote", "progress", 1)
    await module_jobs.complete_photo_upload(session, "a")
    await module_jobs.fail_photo_upload(session, "b", "too dark")
    closed = await page.wait_state("remote", "closed")
    assert closed["reason"] == "completed"
    last = (await page.log("remote", "progress"))[-1]
    assert (last["uploaded"], last["failed"], last["status"]) == (1, 1, "COMPLETED")
    assert last["failures"] == {"b": "too dark"}
    request = page.requests_of(session)[0][1]
    assert request.url.startswith(relay.base_url)
    assert request.headers["origin"] == APP_ORIGIN
    assert page.errors == []
