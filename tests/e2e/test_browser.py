"""The live progress page (PROTOCOL §8) in a real browser: Debian's chromium, headless, driven by
Playwright, against real relays fed by a real worker.

The page records every event it received and applied in ``window.rapidphotoDemo``; the tests hold
that record, and the ``data-*`` attributes the page shows, to what the worker wrote in Redis.
Playwright's own browser download cannot work here, so the browser is ``/usr/bin/chromium``
(``scripts/ensure-chromium``); when none can be had the tests fail, saying why, rather than skip.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from rapidphoto_tools.client import UploadJobsClient
from tests.e2e.conftest import NOTIFICATION_STREAM, Cluster, Truth, drive, fresh, running
from tests.support.sse import open_sse

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO_HTML = REPO / "services" / "relay" / "src" / "rapidphoto_relay" / "static" / "demo.html"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Where a person (or CI) finds the finished page's picture; /artifacts/ is gitignored.
ARTIFACT = REPO / "artifacts" / "demo.png"


def chromium() -> str:
    """The browser, installed on demand; a loud failure (never a skip) when it cannot be had."""
    if not CHROMIUM.exists():
        done = subprocess.run(
            [str(REPO / "scripts" / "ensure-chromium")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(
                "no browser for the live progress page test: scripts/ensure-chromium failed "
                f"({done.returncode}):\n{done.stderr}",
                pytrace=False,
            )
    return str(CHROMIUM)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    executable = chromium()
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile: no cookies, no cache
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


class DemoPage:
    """One open /demo page and what it shows."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    @classmethod
    async def open(cls, context: BrowserContext, url: str) -> DemoPage:
        page = context.pages[0] if context.pages else await context.new_page()
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


def test_demo_page_is_the_packaged_file_and_only_with_relay_demo(
    cluster_factory: Callable[[str], Cluster], redis_url: str
) -> None:
    cluster = cluster_factory(redis_url).start(
        relays=2, worker=False, each=[{"RELAY_DEMO": "1"}, {"RELAY_DEMO": "0"}]
    )
    on, off = cluster.relays
    page = httpx.get(on.base_url + "/demo", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"  # its URL carries a token
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.content == DEMO_HTML.read_bytes()
    assert b"EventSource" in page.content
    missing = httpx.get(off.base_url + "/demo", timeout=5)
    assert missing.status_code == 404
    assert missing.json() == {"error": "Not Found"}


async def test_page_shows_exact_progress_and_resumes_by_itself_after_its_relay_dies(
    cluster_factory: Callable[[str], Cluster],
    redis_url: str,
    jobs: UploadJobsClient,
    truth: Truth,
    browser: BrowserContext,
    tmp_path: Path,
) -> None:
    cluster = cluster_factory(redis_url).start(relays=1, RELAY_DEMO="1", SSE_RETRY_MS="1000")
    relay = cluster.relays[0]
    user, first, second = fresh("u"), fresh("album"), fresh("trip")
    token = cluster.token(user)
    await jobs.start_upload_session(first, user, total_photos=8)
    await jobs.start_upload_session(second, user, total_photos=80)
    await truth.wait_status(first, "IN_PROGRESS")
    await truth.wait_status(second, "IN_PROGRESS")

    demo = await DemoPage.open(browser, demo_url(relay.base_url, token, first, second))
    for session in (first, second):
        await demo.wait_session(session, status="IN_PROGRESS", connection="open")
    await demo.wait_notifications_open()

    # 1. A session runs to completion: exact counts, its failures with reasons, the notification.
    for n in range(6):
        await jobs.complete_photo_upload(first, f"p{n}")
    await jobs.fail_photo_upload(first, "p6", "file too large (52 MB)")
    await jobs.fail_photo_upload(first, "p7", "unsupported format: .heic")
    await demo.wait_session(first, status="COMPLETED", connection="closed")
    shown = await demo.session(first)
    assert (shown["uploaded"], shown["failed"], shown["total"]) == ("6", "2", "8")
    assert shown["why"] == ""
    assert await demo.failures(first) == await truth.failures(first)
    assert await demo.failures(first) == {
        "p6": "file too large (52 MB)",
        "p7": "unsupported format: .heic",
    }
    await demo.wait(
        "the first notification",
        "(s) => !!document.querySelector(`[data-notification-session='${s}']`)",
        first,
    )
    assert await demo.notifications() == [("UPLOAD_SESSION_COMPLETED", first)]
    log = await truth.log(first)
    received = await demo.received(first)
    assert [e["type"] for e in received] == ["SESSION_SNAPSHOT"] + [e.type for e in log[1:]] + [
        "STREAM_CLOSED"
    ]
    assert [e["id"] for e in await demo.applied(first)] == [e.id for e in log]

    # 2. Mid-session, the relay serving the page is SIGKILLed and restarted on its port, then
    # SIGTERMed (STREAM_CLOSED shutdown) and restarted again. Photos keep coming meanwhile.
    async with running(drive(jobs, second, 80, every=0.1)) as driving:
        await demo.wait_applied(second, 12)
        relay.proc.kill()
        killed_at = time.monotonic()
        relay = await asyncio.to_thread(cluster.restart_relay, relay)
        await demo.wait_session(second, connection="open", within=20)
        reconnected = time.monotonic() - killed_at
        applied_before_term = len(await demo.applied(second))
        await demo.wait_applied(second, applied_before_term + 5)
        relay.proc.signal(signal.SIGTERM)
        await asyncio.to_thread(relay.proc.wait, 10)
        relay = await asyncio.to_thread(cluster.restart_relay, relay)
        failed = await asyncio.wait_for(driving, 60)

    await demo.wait_session(second, status="COMPLETED", connection="closed", within=30)
    await demo.wait(
        "the second notification",
        "(s) => !!document.querySelector(`[data-notification-session='${s}']`)",
        second,
    )
    shown = await demo.session(second)
    assert (shown["uploaded"], shown["failed"], shown["total"]) == (
        str(80 - len(failed)),
        str(len(failed)),
        "80",
    )
    assert await truth.counts(second) == (80 - len(failed), len(failed), "COMPLETED")
    assert await demo.failures(second) == await truth.failures(second)
    assert set(await demo.failures(second)) == failed

    # Nothing lost, nothing applied twice: what the page applied is exactly the log, once.
    log = await truth.log(second)
    applied = await demo.applied(second)
    assert [e["id"] for e in applied] == [e.id for e in log], "applied events differ from the log"
    received = await demo.received(second)
    ids = [e["id"] for e in received if e["type"] not in ("SESSION_SNAPSHOT", "STREAM_CLOSED")]
    assert len(ids) == len(set(ids)) == len(log) - 1, "the relay sent an event twice"
    # One snapshot only (the first connection): both resumptions went by Last-Event-ID.
    assert [e["type"] for e in received].count("SESSION_SNAPSHOT") == 1
    closes = [e["data"]["reason"] for e in received if e["type"] == "STREAM_CLOSED"]
    # SIGKILL closes nothing (the connection just drops); SIGTERM says shutdown; then completed.
    assert closes == ["shutdown", "completed"]
    ledger = await demo.ledger()
    assert ledger["duplicates"] == []
    states = [s["state"] for s in ledger["states"] if s["stream"] == second]
    assert states.count("reconnecting") >= 2, states
    assert states[-1] == "closed", states
    assert sorted(await demo.notifications()) == sorted(
        [("UPLOAD_SESSION_COMPLETED", first), ("UPLOAD_SESSION_COMPLETED", second)]
    )
    assert demo.errors == []
    assert reconnected < 15

    await demo.screenshot(tmp_path / "demo.png", ARTIFACT)


async def test_page_stops_on_refusals_and_says_why(
    cluster_factory: Callable[[str], Cluster],
    redis_url: str,
    jobs: UploadJobsClient,
    truth: Truth,
    browser: BrowserContext,
) -> None:
    cluster = cluster_factory(redis_url).start(relays=1, RELAY_DEMO="1", SSE_RETRY_MS="500")
    relay = cluster.relays[0]
    user, other = fresh("u"), fresh("someone-else")
    theirs, done = fresh("theirs"), fresh("done")
    await jobs.start_upload_session(theirs, other, total_photos=1)
    await jobs.start_upload_session(done, user, total_photos=1)
    await jobs.fail_photo_upload(done, "only", "virus detected")
    await truth.wait_status(done, "COMPLETED")
    await truth.wait_status(theirs, "IN_PROGRESS")

    url = demo_url(relay.base_url, cluster.token(user), theirs, "not.an.id", done)
    demo = await DemoPage.open(browser, url)
    await demo.wait_session(theirs, connection="error")
    await demo.wait_session("not.an.id", connection="error")
    await demo.wait_session(done, connection="closed", status="COMPLETED")
    assert (await demo.session(theirs))["why"].startswith("refused (403)")
    assert (await demo.session(theirs))["status"] == "PENDING"
    assert (await demo.session("not.an.id"))["why"].startswith("refused (400)")
    finished = await demo.session(done)
    assert (finished["uploaded"], finished["failed"], finished["total"]) == ("0", "1", "1")
    assert await demo.failures(done) == {"only": "virus detected"}

    expired = cluster.token(user, ttl=-60)
    demo = await DemoPage.open(browser, demo_url(relay.base_url, expired, done))
    await demo.wait_session(done, connection="error")
    assert (await demo.session(done))["why"].startswith("refused (401)")
    await demo.wait(
        "the notification stream refused",
        """() => document.getElementById("notifications-box").dataset.connection === "error" """,
    )
    # It stopped: no retry loop hammering the relay. Each stream was refused twice (EventSource,
    # then the page's one probe asking why), and no more over three SSE_RETRY_MS periods: an
    # absence, so this one wait is a fixed observation window.
    refused = relay.metric("rapidphoto_relay_auth_failures_total", 'reason="expired"')
    assert refused == 4  # 2 streams (the session, the notifications) x 2
    await asyncio.sleep(1.5)
    assert relay.metric("rapidphoto_relay_auth_failures_total", 'reason="expired"') == refused
    assert demo.errors == []

    # A token that expires while the page is open: STREAM_CLOSED token-expired, and it stops.
    live = fresh("live")
    await jobs.start_upload_session(live, user, total_photos=3)
    await truth.wait_status(live, "IN_PROGRESS")
    demo = await DemoPage.open(browser, demo_url(relay.base_url, cluster.token(user, ttl=4), live))
    await demo.wait_session(live, status="IN_PROGRESS", connection="open")
    await demo.wait_session(live, connection="error", within=10)
    assert (await demo.session(live))["why"] == "stopped: token-expired"
    await demo.wait(
        "the notification stream stopped",
        """() => document.querySelector("#notifications-box .why").textContent
                 === "stopped: token-expired" """,
    )
    closes = [e for e in (await demo.ledger())["received"] if e["type"] == "STREAM_CLOSED"]
    assert sorted(e["stream"] for e in closes) == sorted([live, "notifications"])


async def test_page_retries_a_busy_relay_and_catches_up(
    cluster_factory: Callable[[str], Cluster],
    redis_url: str,
    jobs: UploadJobsClient,
    truth: Truth,
    browser: BrowserContext,
) -> None:
    """The user already holds both streams the relay allows them: the page's are refused with
    429 + Retry-After. The page keeps retrying (EventSource alone would give up for good); the
    session completes meanwhile; once slots free up both streams connect and catch up: the
    session from its snapshot, the notifications from the log since the page opened."""
    cluster = cluster_factory(redis_url).start(
        relays=1, RELAY_DEMO="1", RELAY_MAX_CONNECTIONS_PER_USER="2"
    )
    relay = cluster.relays[0]
    user, session = fresh("u"), fresh("s")
    token = cluster.token(user)
    await jobs.start_upload_session(session, user, total_photos=2)
    await truth.wait_status(session, "IN_PROGRESS")
    async with (
        open_sse(relay.base_url, NOTIFICATION_STREAM, token=token) as held_1,
        open_sse(relay.base_url, NOTIFICATION_STREAM, token=token) as held_2,
    ):
        assert held_1.status_code == held_2.status_code == 200
        demo = await DemoPage.open(browser, demo_url(relay.base_url, token, session))
        for stream in (session, "notifications"):
            await demo.wait(
                f"{stream} refused with 429",
                """(name) => window.rapidphotoDemo.states.some(
                    (s) => s.stream === name && s.reason.includes("429"))""",
                stream,
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
    await demo.wait(
        "the notification published while the page was refused",
        "(s) => !!document.querySelector(`[data-notification-session='${s}']`)",
        session,
        within=30,
    )
    assert await demo.notifications() == [("UPLOAD_SESSION_COMPLETED", session)]
    assert (await demo.ledger())["duplicates"] == []
    assert demo.errors == []
