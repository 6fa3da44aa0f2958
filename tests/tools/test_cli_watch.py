"""``rapidphoto watch`` against the package's real relays: under a pseudo-terminal (as a person
runs it) the screen shows the bars, the counts and the failures, and the command exits 0 once the
session completed; a refusal exits 1 with its reason; bad input exits 2 before connecting."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import threading

import pytest

from rapidphoto_tools.cli import main
from tests.conftest import TEST_SECRET
from tests.support.processes import BIN
from tests.support.seed import Seeder
from tests.tools.conftest import Relays, fresh, token

#: CSI and OSC escape sequences (cursor moves, colours, titles): what remains is the text drawn.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>78]")


class Terminal:
    """A command on a pseudo-terminal of a fixed size; its output read as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str], columns: int = 120) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self._master = master
        self._raw = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the other side closed
                return
            if not chunk:
                return
            with self._lock:
                self._raw += chunk

    @property
    def text(self) -> str:
        with self._lock:
            raw = self._raw
        return ANSI.sub("", raw.decode("utf-8", errors="replace"))

    # Ceilings, not delays: on a busy 2-core machine the command alone takes seconds to start.
    async def shows(self, wanted: str, within: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while wanted not in self.text:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{wanted!r} never shown; screen so far:\n{self.text}")
            await asyncio.sleep(0.05)

    async def exit_code(self, within: float = 60.0) -> int:
        code = await asyncio.to_thread(self.proc.wait, within)
        await asyncio.to_thread(self._reader.join, 5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._master)


def _env(user: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "RELAY_", "RAPID"))}
    env.update(RAPIDPHOTO_TOKEN=token(user), TERM="xterm-256color", COLUMNS="120", LINES="30")
    return env


async def test_the_screen_shows_bars_and_failures_and_exits_0_once_completed(
    relays: Relays, seed: Seeder
) -> None:
    """Two sessions and the notifications: one multi-session stream, a bar for each."""
    first, second, user = fresh("s"), fresh("s"), fresh("u")
    await seed.start(first, user, 4)
    await seed.start(second, user, 1)
    argv = [str(BIN / "rapidphoto"), "watch", first, second, "--notifications"]
    argv += ["--relay", relays.url(0), "--timeout", "60"]
    terminal = Terminal(argv, _env(user))
    try:
        await terminal.shows("0/4")  # the snapshots drawn: the stream is open
        await terminal.shows("0/1")
        await terminal.shows("connection: open")
        await seed.upload(first, "p1")
        await seed.fail(first, "p2", "checksum mismatch")
        await terminal.shows("2/4  1 uploaded, 1 failed")
        await seed.upload(second, "p1")
        await terminal.shows(f"UPLOAD_SESSION_COMPLETED {second}: 1 uploaded, 0 failed of 1")
        await seed.upload(first, "p3")
        await seed.upload(first, "p4")
        code = await terminal.exit_code()
        screen = terminal.text
    finally:
        terminal.close()
    assert code == 0, screen
    assert " 100%  4/4  3 uploaded, 1 failed" in screen
    assert " 100%  1/1  1 uploaded, 0 failed" in screen
    assert "COMPLETED" in screen
    assert f"{first} p2: checksum mismatch" in screen
    assert "━" in screen  # the bars themselves
    assert "all 2 session(s) completed" in screen
    assert token(user)[:20] not in screen


async def test_a_refusal_exits_1_with_its_reason(
    relays: Relays,
    seed: Seeder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    session, owner, other = fresh("s"), fresh("u"), fresh("u")
    await seed.start(session, owner, 1)
    monkeypatch.setenv("RAPIDPHOTO_TOKEN", token(other))
    argv = ["watch", session, "--relay", relays.url(1), "--timeout", "30"]
    assert await asyncio.to_thread(main, argv) == 1
    captured = capsys.readouterr()
    assert "refused: forbidden" in captured.err
    assert "connection: error" in captured.out


async def test_a_session_the_stream_goes_on_without_exits_1_with_its_reason(
    relays: Relays, seed: Seeder
) -> None:
    done, pending, user, stranger = fresh("s"), fresh("s"), fresh("u"), fresh("u")
    await seed.start(done, user, 1)
    argv = [str(BIN / "rapidphoto"), "watch", done, pending]
    argv += ["--relay", relays.url(1), "--timeout", "30"]
    terminal = Terminal(argv, _env(user))
    try:
        await terminal.shows("connection: open")
        # `pending` appears with another owner (SESSION_CLOSED forbidden), `done` completes.
        await seed.start(pending, stranger, 1)
        await terminal.shows("closed: forbidden")
        await seed.upload(done, "p1")
        code = await terminal.exit_code()
        screen = terminal.text
    finally:
        terminal.close()
    assert code == 1, screen
    assert f"session {pending}: forbidden" in screen


def test_bad_input_exits_2_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("RAPIDPHOTO_TOKEN", "JWT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["watch"]) == 2
    assert "nothing to watch" in capsys.readouterr().err
    assert main(["watch", "s1"]) == 2
    assert "no token" in capsys.readouterr().err
    assert main(["watch", "s1", "--user", "alice"]) == 2  # no JWT_SECRET to sign with
    assert "JWT_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("JWT_SECRET", TEST_SECRET)
    assert main(["watch", "bad id", "--user", "alice"]) == 2
    assert "session must match" in capsys.readouterr().err
