"""The live progress page (PROTOCOL §8) in a real browser: Debian's chromium, headless, driven by
Playwright, against real relays fed by a real worker.

The page is built on the relay's browser module (/client/rapidphoto-realtime.js; its own tests are
in test_browser_module.py) and holds ONE stream for all its sessions and the notifications
(PROTOCOL §5.1). It records every event it received and applied in ``window.rapidphotoDemo``; the
tests hold that record, and the ``data-*`` attributes the page shows, to what the worker wrote in
Redis. One browser and one stack serve the whole module (tests/support/browser.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, Request
from playwright.async_api import TimeoutError as PlaywrightTimeout

from rapidphoto_tools.client import UploadJobsClient
from tests.conftest import CPU_HEAVY
from tests.e2e.conftest import (
    NOTIFICATION_STREAM,
    Cluster,
    Truth,
    drive,
    eventually,
    fresh,
    running,
)
from tests.support.browser import CLIENT_MODULE_JS, CLIENT_MODULE_PATH, DEMO_HTML, REPO
from tests.support.sse import open_sse

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), CPU_HEAVY]

#: Where a person (or CI) finds the finished page's picture; /artifacts/ is gitignored.
ARTIFACT = REPO / "artifacts" / "demo.png"
MULTI_STREAM = "/api/upload/sessions/stream"


@pytest.fixture(scope="module")
def stack(module_cluster_factory: Callable[[], Cluster]) -> Cluster:
    """A worker and two relays for the module: the page's (RELAY_DEMO=1, two streams per user, a
    1 s retry), and one without the page (RELAY_DEMO=0)."""
    return module_cluster_factory().start(
        relays=2,
        each=[
            {"RELAY_DEMO": "1", "SSE_RETRY_MS": "1000", "RELAY_MAX_CONNECTIONS_PER_USER": "2"},
            {"RELAY_DEMO": "0"},
        ],
    )


class DemoPage:
    """One open /demo page and what it shows."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        #: The page's stream requests (it holds one stream at a time: this URL).
        self.requests: list[Request] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda r: self.requests.append(r) if MULTI_STREAM in r.url else None)

    @classmethod
    async def open(cls, context: BrowserContext, url: str) -> DemoPage:
        page = await context.new_page()  # a page of its own: the last one's listeners stay there
        demo = cls(page)
        response = await page.goto(url)
        assert response is not None
        assert response.status == 200
        return demo

    async def session(self, session_id: str) -> dict[str, str]:
        state: dict[str, str] = await self.page.evaluate(
            """(id) => {
                const box = document.querySelector(`[data-session-id="${CSS.escape(id)}"]`);
                return box ? Object.assign({}, box.dataset,
                    {why: box.querySelector(".why").textContent}) : null;
            }""",
            session_id,
        )
        return state

    async def failures(self, session_id: str) -> dict[str, str]:
        shown: dict[str, str] = await self.page.evaluate(
            """(id) => Object.fromEntries([...document.querySelectorAll(
                `[data-session-id="${CSS.escape(id)}"] [data-photo-id]`)]
                .map((li) => [li.dataset.photoId, li.dataset.reason]))""",
            session_id,
        )
        return shown

    async def notifications(self) -> list[tuple[str, str]]:
        shown: list[list[str]] = await self.page.evaluate(
            """() => [...document.querySelectorAll("[data-notification-kind]")]
                .map((li) => [li.dataset.notificationKind, li.dataset.notificationSession])"""
        )
        return [(kind, session) for kind, session in shown]

    async def ledger(self) -> dict[str, list[dict[str, Any]]]:
        ledger: dict[str, list[dict[str, Any]]] = await self.page.evaluate(
            "() => window.rapidphotoDemo"
        )
        return ledger

    async def applied(self, stream: str) -> list[dict[str, Any]]:
        return [e for e in (await self.ledger())["applied"] if e["stream"] == stream]

    async def received(self, stream: str) -> list[dict[str, Any]]:
        return [e for e in (await self.ledger())["received"] if e["stream"] == stream]

    async def wait(self, what: str, expression: str, arg: Any = None, within: float = 20) -> None:
        try:
            await self.page.wait_for_function(expression, arg=arg, timeout=within * 1000)
        except PlaywrightTimeout:
            ledger = await self.ledger()
            raise AssertionError(
                f"page: timed out after {within} s waiting for {what}; "
                f"connection states: {ledger['states']}; errors: {self.errors}"
            ) from None

    async def wait_session(self, session_id: str, within: float = 20, **want: str) -> None:
        await self.wait(
            f"{session_id} {want}",
            """([id, want]) => {
                const box = document.querySelector(`[data-session-id="${CSS.escape(id)}"]`);
                return box && Object.entries(want).every(([k, v]) => box.dataset[k] === v);
            }""",
            [session_id, want],
            within,
        )

    async def wait_all(self, sessions: list[str], within: float = 20, **want: str) -> None:
        """Every one of ``sessions`` shows ``want`` at the same moment."""
        await self.wait(
            f"all of {len(sessions)} sessions {want}",
            """([ids, want]) => ids.every((id) => {
                const box = document.querySelector(`[data-session-id="${CSS.escape(id)}"]`);
                return box && Object.entries(want).every(([k, v]) => box.dataset[k] === v);
            })""",
            [sessions, want],
            within,
        )

    async def stopped_for_good(self) -> bool:
        """No stream of the page will try again (no retry is pending or can be scheduled)."""
        stopped: bool = await self.page.evaluate(
            "() => window.rapidphotoStreams.every((s) => !s.running && s.timer === null)"
        )
        return stopped

    async def wait_notifications_open(self) -> None:
        await self.wait(
            "the notification stream open",
            """() => document.getElementById("notifications-box").dataset.connection === "open" """,
        )

    async def wait_applied(self, stream: str, count: int, within: float = 20) -> None:
        await self.wait(
            f"{count} events applied on {stream}",
            """([s, n]) => window.rapidphotoDemo.applied.filter((e) => e.stream === s).length >= n""",
            [stream, count],
            within,
        )

    async def screenshot(self, *paths: Path) -> None:
        image = await self.page.screenshot(full_page=True)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image)


def demo_url(base_url: str, token: str, *sessions: str) -> str:
    query = "&".join(f"session={s}" for s in sessions)
    return f"{base_url}/demo?access_token={token}&{query}"


async def test_module_and_page_are_the_packaged_files(stack: Cluster) -> None:
    """The module is served by every relay, RELAY_DEMO or not, as JavaScript that browsers keep and
    revalidate (ETag, 304) and that pages on other origins may import; /demo only with RELAY_DEMO."""
    on, off = stack.relays
    async with httpx.AsyncClient(timeout=5) as http:
        for relay in (on, off):
            module = await http.get(relay.base_url + CLIENT_MODULE_PATH)
            assert module.status_code == 200
            assert module.headers["content-type"] == "text/javascript; charset=utf-8"
            assert module.headers["cache-control"] == "no-cache"
            assert module.headers["x-content-type-options"] == "nosniff"
            assert module.headers["access-control-allow-origin"] == "*"
            assert module.content == CLIENT_MODULE_JS.read_bytes()
            etag = module.headers["etag"]
            again = await http.get(
                relay.base_url + CLIENT_MODULE_PATH, headers={"If-None-Match": f"W/{etag}"}
            )
            assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
            stale = await http.get(
                relay.base_url + CLIENT_MODULE_PATH, headers={"If-None-Match": '"older"'}
            )
            assert stale.status_code == 200
        page = await http.get(on.base_url + "/demo")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"  # its URL carries a token
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.content == DEMO_HTML.read_bytes()
        assert b'from "/client/rapidphoto-realtime.js"' in page.content
        assert b"EventSource(" not in page.content  # one fetch stream, through the module
        missing = await http.get(off.base_url + "/demo")
        assert missing.status_code == 404
        assert missing.json() == {"error": "Not Found"}


async def test_eight_sessions_live_at_once_over_http1_and_resumed_after_the_relay_dies(
    stack: Cluster,
    module_jobs: UploadJobsClient,
    module_truth: Truth,
    browser: BrowserContext,
    tmp_path: Path,
) -> None:
    """Eight sessions on one page over HTTP/1.1 (six connections per host at most): one stream
    carries them all and the notifications, every box live at once with exact counts. Mid-run the
    relay is SIGKILLed and restarted: the page resumes with its cursor and ends with exactly the
    log of every session, nothing lost or applied twice, and every completion's notification once.
    (STREAM_CLOSED shutdown, after SIGTERM, is resumed in test_browser_module.py.)"""
    jobs, truth = module_jobs, module_truth
    relay = stack.relays[0]
    user = fresh("u")
    sessions = [fresh(f"batch{n}") for n in range(8)]
    total = 40
    for session in sessions:
        await jobs.start_upload_session(session, user, total_photos=total)
    for session in sessions:
        await truth.wait_status(session, "IN_PROGRESS")

    demo = await DemoPage.open(browser, demo_url(relay.base_url, stack.token(user), *sessions))
    protocol = await demo.page.evaluate(
        "() => performance.getEntriesByType('navigation')[0].nextHopProtocol"
    )
    assert protocol == "http/1.1"
    for session in sessions:
        await demo.wait_session(session, status="IN_PROGRESS", connection="open")
    await demo.wait_notifications_open()

    async def one_stream() -> bool:
        return await asyncio.to_thread(relay.open_streams) == 1

    await eventually(one_stream, "the page's one stream on the relay")

    # 1. All eight live at once: after each round, every box shows exactly that count.
    for done in (1, 2, 3):
        for session in sessions:
            await jobs.complete_photo_upload(session, f"p{done}")
        await demo.wait_all(sessions, uploaded=str(done), failed="0", total=str(total))

    # 2. Photos keep coming on all eight while the relay dies under the page.
    async with running(
        asyncio.gather(*(drive(jobs, s, total - 3, every=0.1) for s in sessions))
    ) as driving:
        await demo.wait_applied(sessions[0], 10)
        relay.proc.kill()
        relay = await asyncio.to_thread(stack.restart_relay, relay)
        back_at = time.monotonic()
        # Reconnected: a second "open" in the page's record. (Not the box's state: when the
        # sessions completed during the outage the page catches up and closes within
        # milliseconds, and a poll of the box missed the "open" between: flaky, seen once.)
        await demo.wait(
            "the page reconnected",
            """(s) => window.rapidphotoDemo.states
                .filter((e) => e.stream === s && e.state === "open").length >= 2""",
            sessions[0],
            within=20,
        )
        reconnected = time.monotonic() - back_at
        failed_per_session = await asyncio.wait_for(driving, 90)

    await demo.wait_all(sessions, status="COMPLETED", connection="closed", within=30)
    ledger = await demo.ledger()  # once: it is large, and each read of it costs
    for session, failed in zip(sessions, failed_per_session, strict=True):
        shown = await demo.session(session)
        assert (shown["uploaded"], shown["failed"], shown["total"]) == (
            str(total - len(failed)),
            str(len(failed)),
            str(total),
        )
        assert await truth.counts(session) == (total - len(failed), len(failed), "COMPLETED")
        assert await demo.failures(session) == await truth.failures(session)
        assert set(await demo.failures(session)) == failed

        # Nothing lost, nothing applied twice: what the page applied is exactly the log, once.
        log = await truth.log(session)
        applied = [e for e in ledger["applied"] if e["stream"] == session]
        assert [e["id"] for e in applied] == [e.id for e in log], f"{session}: applied != log"
        received = [e for e in ledger["received"] if e["stream"] == session]
        ids = [e["id"] for e in received if e["type"] != "SESSION_SNAPSHOT"]
        assert len(ids) == len(set(ids)) == len(log) - 1, f"{session}: the relay sent one twice"
        # One snapshot only (the first connection): the resumption went by the cursor.
        assert [e["type"] for e in received].count("SESSION_SNAPSHOT") == 1
        states = [s["state"] for s in ledger["states"] if s["stream"] == session]
        assert "reconnecting" in states, states
        assert states[-1] == "closed", states

    await demo.wait(
        "the eight notifications",
        "(n) => document.querySelectorAll('[data-notification-kind]').length >= n",
        len(sessions),
    )
    assert sorted(await demo.notifications()) == sorted(
        ("UPLOAD_SESSION_COMPLETED", s) for s in sessions
    )
    ledger = await demo.ledger()
    # SIGKILL closes nothing (the connection just drops), and with the notifications on it the
    # stream never closes as completed.
    assert [e for e in ledger["received"] if e["type"] == "STREAM_CLOSED"] == []
    assert ledger["duplicates"] == []
    # The token went in a header, never in the stream's URL; every attempt after the first
    # resumed from the cursor the page held when its stream broke.
    requests = demo.requests
    cursors = {c["cursor"] for c in ledger["connections"] if c["state"] == "reconnecting"}
    assert len(requests) >= 2
    assert all("access_token" not in r.url for r in requests)
    assert all(r.headers.get("authorization", "").startswith("Bearer ") for r in requests)
    assert "last-event-id" not in requests[0].headers
    assert all(r.headers.get("last-event-id") in cursors for r in requests[1:])
    assert demo.errors == []
    assert reconnected < 10  # the page keeps trying while the relay is down

    await demo.screenshot(tmp_path / "demo.png", ARTIFACT)


async def test_page_stops_on_refusals_and_says_why(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    jobs, truth = module_jobs, module_truth
    relay = stack.relays[0]
    user, other = fresh("u"), fresh("someone-else")
    theirs, done, later = fresh("theirs"), fresh("done"), fresh("later")
    await jobs.start_upload_session(theirs, other, total_photos=1)
    await jobs.start_upload_session(done, user, total_photos=1)
    await jobs.fail_photo_upload(done, "only", "virus detected")
    await truth.wait_status(done, "COMPLETED")
    await truth.wait_status(theirs, "IN_PROGRESS")
    token = stack.token(user)

    # An id the relay would refuse is shown as such and left out of the stream; a session that
    # appears with another owner is closed alone (SESSION_CLOSED), the others go on.
    demo = await DemoPage.open(browser, demo_url(relay.base_url, token, done, "not.an.id", later))
    await demo.wait_session(done, connection="closed", status="COMPLETED")
    await demo.wait_session("not.an.id", connection="error")
    assert (await demo.session("not.an.id"))["why"] == "refused: not a session id"
    finished = await demo.session(done)
    assert (finished["uploaded"], finished["failed"], finished["total"]) == ("0", "1", "1")
    assert await demo.failures(done) == {"only": "virus detected"}
    await demo.wait_session(later, connection="open", status="PENDING")
    await jobs.start_upload_session(later, other, total_photos=2)
    await demo.wait_session(later, connection="error")
    assert (await demo.session(later))["why"] == "stopped: forbidden"
    assert (await demo.session(later))["status"] == "PENDING"
    await demo.wait_notifications_open()  # the stream goes on for the notifications

    # A session of someone else among the page's: 403 for the whole stream, said on every box,
    # and no retry.
    mine = fresh("mine")
    await jobs.start_upload_session(mine, user, total_photos=2)
    demo = await DemoPage.open(browser, demo_url(relay.base_url, token, mine, theirs))
    for session in (mine, theirs):
        await demo.wait_session(session, connection="error")
        assert (await demo.session(session))["why"].startswith("refused (403)")
    assert await demo.stopped_for_good()
    assert len(demo.requests) == 1

    # An expired token: 401, once.
    before = await asyncio.to_thread(
        relay.metric, "rapidphoto_relay_auth_failures_total", 'reason="expired"'
    )
    demo = await DemoPage.open(browser, demo_url(relay.base_url, stack.token(user, ttl=-60), done))
    await demo.wait_session(done, connection="error")
    assert (await demo.session(done))["why"].startswith("refused (401)")
    await demo.wait(
        "the notifications refused",
        """() => document.getElementById("notifications-box").dataset.connection === "error" """,
    )
    assert await demo.stopped_for_good()
    after = await asyncio.to_thread(
        relay.metric, "rapidphoto_relay_auth_failures_total", 'reason="expired"'
    )
    assert after - before == 1
    assert len(demo.requests) == 1
    assert demo.errors == []

    # A token that expires while the page is open: STREAM_CLOSED token-expired, and it stops.
    live = fresh("live")
    await jobs.start_upload_session(live, user, total_photos=3)
    await truth.wait_status(live, "IN_PROGRESS")
    demo = await DemoPage.open(browser, demo_url(relay.base_url, stack.token(user, ttl=4), live))
    await demo.wait_session(live, status="IN_PROGRESS", connection="open")
    await demo.wait_session(live, connection="error", within=10)
    assert (await demo.session(live))["why"] == "stopped: token-expired"
    await demo.wait(
        "the notifications stopped",
        """() => document.querySelector("#notifications-box .why").textContent
                 === "stopped: token-expired" """,
    )
    closes = [e for e in (await demo.ledger())["received"] if e["type"] == "STREAM_CLOSED"]
    assert [e["data"]["reason"] for e in closes] == ["token-expired"]
    assert await demo.stopped_for_good()


async def test_page_retries_a_busy_relay_and_catches_up(
    stack: Cluster, module_jobs: UploadJobsClient, module_truth: Truth, browser: BrowserContext
) -> None:
    """The user already holds both streams the relay allows them: the page's one stream is refused
    with 429 + Retry-After. The page keeps retrying (EventSource alone would give up for good);
    the session completes meanwhile; once a slot frees up the stream connects and catches up from
    the snapshot, and the notifications go live.

    (A notification published before the page's first stream was admitted is not shown: the
    multi-session stream has no cursor to give before its first frame, and without one the
    notifications start live, PROTOCOL §5.1. The session's snapshot shows its completion.)"""
    jobs, truth = module_jobs, module_truth
    relay = stack.relays[0]
    user, session = fresh("u"), fresh("s")
    token = stack.token(user)
    await jobs.start_upload_session(session, user, total_photos=2)
    await truth.wait_status(session, "IN_PROGRESS")
    async with (
        open_sse(relay.base_url, NOTIFICATION_STREAM, token=token) as held_1,
        open_sse(relay.base_url, NOTIFICATION_STREAM, token=token) as held_2,
    ):
        assert held_1.status_code == held_2.status_code == 200
        demo = await DemoPage.open(browser, demo_url(relay.base_url, token, session))
        await demo.wait(
            "the stream refused with 429",
            """(name) => window.rapidphotoDemo.states.some(
                (s) => s.stream === name && s.reason.includes("429; retrying in 1 s"))""",
            session,
        )
        await jobs.complete_photo_upload(session, "a")
        await jobs.fail_photo_upload(session, "b", "timeout")
        await truth.wait_status(session, "COMPLETED")
        shown = await demo.session(session)
        assert (shown["status"], shown["connection"]) == ("PENDING", "reconnecting")
    # The held streams are gone: the page gets in at its next retry.
    await demo.wait_session(session, status="COMPLETED", connection="closed", within=30)
    shown = await demo.session(session)
    assert (shown["uploaded"], shown["failed"], shown["total"]) == ("1", "1", "2")
    assert await demo.failures(session) == {"b": "timeout"}
    await demo.wait_notifications_open()
    other = fresh("s")
    await jobs.start_upload_session(other, user, total_photos=1)
    await jobs.complete_photo_upload(other, "x")
    await demo.wait(
        "a notification published once the stream is open",
        "(s) => !!document.querySelector(`[data-notification-session='${s}']`)",
        other,
    )
    assert await demo.notifications() == [("UPLOAD_SESSION_COMPLETED", other)]
    assert (await demo.ledger())["duplicates"] == []
    assert demo.errors == []
