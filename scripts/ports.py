"""Loopback ports for the processes we start (the stack script, the tests, the load tests), handed out
so that no two callers on this machine get the same one, whatever process they run in.

The usual trick, binding port 0 and closing the socket, leaves a window between the close and the
child's own bind in which anything else may take the port: another pytest-xdist worker doing the
same, a second test run, or the kernel giving it to an outgoing connection (port 0 and connect()
both draw from the ephemeral range). Under ``pytest -n`` that window is hit: a relay that exits with
EADDRINUSE, or worse, a readiness probe answered by another test's relay on the same port.

So a port comes from a range below the kernel's ephemeral range (``ip_local_port_range``), where
only programs that name a port bind, and is *leased*: an exclusive ``flock`` on a file named after
it in a directory every process shares, held by the process that asked until it exits (or until it
has taken :data:`LEASES_KEPT` newer ones). Other callers skip leased ports; the kernel frees the
lock when its holder dies, however it dies. The caller keeps its port across restarts of its child
(a relay or Redis restarted on the same port) without anyone else taking it in between.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

#: Where ports are handed out from, ephemeral ones left out (see :func:`_candidates`). Redis Cluster
#: nodes listen on a second, "bus" port (port + 10000 by default): give it its own free_port()
#: with ``--cluster-port`` rather than relying on the offset.
PORT_RANGE = range(20000, 32768)

#: The leases, one file per port (never removed: an empty file costs nothing and removing one
#: while another process opens it would hand out a port twice).
LEASE_DIR = Path(tempfile.gettempdir()) / "rapidphoto-ports"

#: Leases a process keeps: the oldest is given back past this many. A port is needed from its
#: lease until the child has bound it (then the kernel refuses it to others) and across restarts
#: of that child; a few hundred leases later its test is long over. Bounded so that many
#: concurrent runs cannot use the range up.
LEASES_KEPT = 256

_held: collections.OrderedDict[int, int] = collections.OrderedDict()  # port -> lease file's fd
_guard = threading.Lock()
_next: int | None = None  # where this process looks next in the range


def ephemeral_ports() -> range:
    """The ports the kernel hands out by itself (bind to port 0, connect)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def _candidates() -> list[int]:
    ephemeral = ephemeral_ports()
    ports = [p for p in PORT_RANGE if p not in ephemeral]
    # A machine whose ephemeral range covers all of ours: the leases still keep our own callers
    # apart; only the kernel's picks for outgoing connections are no longer ruled out.
    return ports or list(PORT_RANGE)


def _bindable(port: int) -> bool:
    """Nothing holds ``port`` on loopback now: no listener, no connection, no TIME_WAIT (no
    SO_REUSEADDR here, on purpose: stricter than the servers we start, which all set it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _lease(port: int) -> int | None:
    """The lease's file descriptor when ``port`` was free and is now ours, else None."""
    if port in _held:
        return None
    try:
        fd = os.open(LEASE_DIR / str(port), os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # leased by another process (or another thread's open file here)
        os.close(fd)
        return None
    if not _bindable(port):  # a program outside these leases has it
        os.close(fd)
        return None
    return fd


def _keep(port: int, fd: int) -> None:
    _held[port] = fd
    while len(_held) > LEASES_KEPT:
        _, oldest = _held.popitem(last=False)
        os.close(oldest)


def _lease_dir() -> None:
    if not LEASE_DIR.is_dir():
        with contextlib.suppress(FileExistsError):
            LEASE_DIR.mkdir()
        # Shared by everyone on the machine, like /tmp itself.
        with contextlib.suppress(OSError):
            LEASE_DIR.chmod(0o1777)


def free_port() -> int:
    """A loopback port nothing uses now, leased to this process (see the module's docstring):
    no other caller of :func:`free_port` or :func:`claim_port` on this machine gets it while
    this process lives, so the child it is meant for can bind it later, and again after a restart.
    """
    global _next
    with _guard:
        _lease_dir()
        ports = _candidates()
        if _next is None:  # a random start: concurrent processes rarely contend for the same files
            _next = random.SystemRandom().randrange(len(ports))
        for step in range(len(ports)):
            port = ports[(_next + step) % len(ports)]
            fd = _lease(port)
            if fd is not None:
                _next = (_next + step + 1) % len(ports)
                _keep(port, fd)
                return port
    raise RuntimeError(
        f"no free loopback port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}: every one is "
        f"in use or leased (lease files in {LEASE_DIR})"
    )


def claim_port(port: int) -> bool:
    """Lease this particular ``port`` when it is free and nobody holds its lease (the stack's
    relays after the first: ``--port P`` puts them on P+1, P+2, … when they can be had)."""
    with _guard:
        _lease_dir()
        fd = _lease(port)
        if fd is None:
            return False
        _keep(port, fd)
        return True
