"""Process figures for the status page and /metrics: memory, CPU time, open files, children.

Why /proc rather than psutil: one dependency less for five numbers, and Linux is the deployment
target (systemd unit, nftables ruleset). Where /proc is missing, CPU time comes from
``resource.getrusage`` and the rest is reported as unknown (None), never guessed.

Cost matters because the management listener shares the event loop with TURN and the proxy: a
scrape reads a handful of small files (``/proc/self/stat``, the ``children`` lists of this
process's threads, each child's ``stat``) and never walks all of ``/proc``, so it cannot stall
media relaying on a host with thousands of processes.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcStat", "child_pids", "read_proc", "self_stat"]

_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One process's figures; None = not available on this platform."""

    pid: int
    rss_bytes: int | None
    vms_bytes: int | None
    cpu_seconds: float | None
    start_time: float | None  # Unix time
    threads: int | None
    open_fds: int | None = None
    max_fds: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "rss_bytes": self.rss_bytes,
            "vms_bytes": self.vms_bytes,
            "cpu_seconds": self.cpu_seconds,
            "start_time": self.start_time,
            "threads": self.threads,
            "open_fds": self.open_fds,
            "max_fds": self.max_fds,
        }


def _boot_time() -> float | None:
    try:
        for line in (_PROC / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


_BOOT = _boot_time()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_proc(pid: int) -> ProcStat | None:
    """Figures of process `pid` from /proc/<pid>/stat (proc(5)); None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ": cut at the last.
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        # proc(5) numbers fields from 1; rest[0] is field 3 (state), so field n is rest[n - 3].
        utime, stime = int(rest[11]), int(rest[12])
        threads = int(rest[17])
        start_ticks = int(rest[19])
        vsize = int(rest[20])
        rss_pages = int(rest[21])
    except (IndexError, ValueError):
        return None
    start = _BOOT + start_ticks / _TICKS if _BOOT is not None else None
    return ProcStat(
        pid=pid,
        rss_bytes=rss_pages * _PAGE,
        vms_bytes=vsize,
        cpu_seconds=(utime + stime) / _TICKS,
        start_time=start,
        threads=threads,
    )


def self_stat() -> ProcStat:
    """This process, with open and maximum file descriptors (the usual first exhaustion)."""
    pid = os.getpid()
    st = read_proc(pid)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    max_fds = None if soft == resource.RLIM_INFINITY else int(soft)
    try:
        open_fds: int | None = len(os.listdir(_PROC / "self" / "fd"))
    except OSError:
        open_fds = None
    if st is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ProcStat(pid, None, None, ru.ru_utime + ru.ru_stime, None, None, open_fds, max_fds)
    return ProcStat(
        pid,
        st.rss_bytes,
        st.vms_bytes,
        st.cpu_seconds,
        st.start_time,
        st.threads,
        open_fds,
        max_fds,
    )


def child_pids() -> list[int]:
    """Direct children of this process (proxy workers, when proxy.workers > 1).

    Reads /proc/self/task/<tid>/children (Linux 3.5+, CONFIG_PROC_CHILDREN); a child forked from
    any thread is listed under that thread. Empty where the file does not exist.
    """
    pids: set[int] = set()
    try:
        tasks = os.listdir(_PROC / "self" / "task")
    except OSError:
        return []
    for tid in tasks:
        try:
            text = (_PROC / "self" / "task" / tid / "children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split() if p.isdigit())
    return sorted(pids)
