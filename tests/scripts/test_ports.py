"""``scripts/ports.py``: ports leased across processes, as pytest-xdist workers and concurrent runs
of the suite take them (each child here is such a process)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from scripts.ports import claim_port, ephemeral_ports, free_port

ROOT = Path(__file__).resolve().parents[2]

#: A process that leases ports, prints them, and holds them until its stdin closes.
LEASER = (
    "import sys; from scripts.ports import free_port; "
    "print(*[free_port() for _ in range(int(sys.argv[1]))], flush=True); sys.stdin.read()"
)


@pytest.fixture
def leasers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def lease_in_child(procs: list[subprocess.Popen[str]], count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LEASER, str(count)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def ports_of(proc: subprocess.Popen[str]) -> list[int]:
    assert proc.stdout is not None
    return [int(p) for p in proc.stdout.readline().split()]


def test_concurrent_processes_never_get_the_same_port(
    leasers: list[subprocess.Popen[str]],
) -> None:
    """Before leases, a port was free when picked and could be taken by another xdist worker's
    pick before the child bound it: a relay exiting with EADDRINUSE, or a readiness probe answered
    by another test's relay."""
    procs = [lease_in_child(leasers, 150) for _ in range(4)]  # all at once
    mine = [free_port() for _ in range(50)]
    every = [port for proc in procs for port in ports_of(proc)] + mine
    assert len(every) == 4 * 150 + 50
    assert len(set(every)) == len(every), "a port was handed out twice"
    ephemeral = ephemeral_ports()
    assert not [p for p in every if p in ephemeral], "a port the kernel may hand out by itself"


def test_a_lease_lasts_as_long_as_its_process(leasers: list[subprocess.Popen[str]]) -> None:
    child = lease_in_child(leasers, 1)
    (port,) = ports_of(child)
    assert not claim_port(port), "another process's lease was taken"
    assert child.stdin is not None
    child.stdin.close()  # the child exits: the kernel drops its lock
    child.wait(10)
    assert claim_port(port)
    assert not claim_port(port), "claimed twice"


def test_a_port_in_use_is_never_handed_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not claim_port(listener.getsockname()[1])
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))  # what the child it was leased for does
