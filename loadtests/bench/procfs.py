"""CPU time, memory and process trees from ``/proc``, and where a process runs (Linux only)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``/proc/<pid>/statm``); ``OSError`` when it is gone."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server may run its app in worker processes: granian)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_cpu(pid)
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_kib(member)
    return total


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy, total) seconds since boot, from ``/proc/stat``."""
    out: dict[int, tuple[float, float]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
        busy = user + nice + system + irq + softirq + steal
        out[int(name[3:])] = (busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK)
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pinned(cpu: int) -> list[str]:
    """The argv prefix that runs a command on CPU ``cpu`` alone (nothing on a 1-CPU machine)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


def raise_fd_limit(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 2 * streams + 2000))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # children inherit it


def set_priority(nice: int) -> None:
    """Niceness for this process and its children (Redis, the server, the publisher).

    With the kernel's autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) niceness only
    weighs inside a session's group, so the benchmark also takes a session of its own and gives
    that group the same niceness: other jobs on a shared machine then take less of its cores.
    """
    with contextlib.suppress(OSError):
        os.setsid()  # fails when already a session or group leader: the current group is used
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(f"{nice}\n")


class CpuMeter:
    """CPU-seconds used from its creation to :meth:`read`: by the server (the ``server_pids``), by
    this process, and by every other process on the server's core (CPU 1) and on this one's (0)."""

    def __init__(self, server_pids: Sequence[int]) -> None:
        self.server_pids = server_pids
        self.server0 = tree_cpu(server_pids)
        self.client0 = proc_cpu(os.getpid())
        self.cpus0 = cpu_times()

    def read(self) -> tuple[float, float, float, float]:
        """(server, client, others on CPU 1, others on CPU 0); the last two 0 on a 1-CPU machine."""
        cpus1 = cpu_times()
        server = tree_cpu(self.server_pids) - self.server0
        client = proc_cpu(os.getpid()) - self.client0
        if 1 not in self.cpus0:
            return server, client, 0.0, 0.0
        others_server = max(0.0, cpus1[1][0] - self.cpus0[1][0] - server)
        others_client = max(0.0, cpus1[0][0] - self.cpus0[0][0] - client)
        return server, client, others_server, others_client
