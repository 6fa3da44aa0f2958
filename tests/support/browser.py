"""Headless Chromium for the browser tests (tests/e2e/test_browser*.py), and one stack per module.

Playwright's own browser download cannot work here, so the browser is Debian's ``/usr/bin/chromium``
(``scripts/ensure-chromium``); when none can be had the tests fail, saying why, rather than skip.
Starting Playwright and a browser costs about two seconds, and a relay stack a few more: each test
module starts one browser and one stack and gives each test a fresh browser context (no cookies, no
cache) and fresh users and sessions, so the tests stay independent.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "services" / "relay" / "src" / "rapidphoto_relay" / "static"
CLIENT_MODULE_JS = STATIC / "rapidphoto-realtime.js"
CLIENT_MODULE_PATH = "/client/rapidphoto-realtime.js"
DEMO_HTML = STATIC / "demo.html"
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
                "no browser for the browser tests: scripts/ensure-chromium failed "
                f"({done.returncode}):\n{done.stderr}",
                pytrace=False,
            )
    return str(CHROMIUM)


@contextlib.asynccontextmanager
async def launched_chromium() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()
