"""The running instance's pid file (`server.state_dir/confedge.pid`), so that operator commands
can reach it.

Why a pid file and not an admin API: `confedge cert install` (and `self-signed`) must make the
running service pick up a new certificate, and SIGHUP already does exactly that (runtime.py). The
command needs only the pid of the `confedge run` that uses the same state_dir; the file is written
after start-up succeeded and removed on a clean stop. A stale file (the process died) is detected
by checking that the pid is alive and is a confedge process, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = [
    "PID_NAME",
    "remove_pidfile",
    "running_pid",
    "signal_running",
    "write_pidfile",
]

PID_NAME = "confedge.pid"


def write_pidfile(state_dir: str | os.PathLike[str]) -> Path:
    """Write this process's pid into `state_dir/confedge.pid` (replaced atomically)."""
    path = Path(state_dir) / PID_NAME
    tmp = path.with_name(f".{PID_NAME}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
    os.replace(tmp, path)
    return path


def remove_pidfile(path: Path) -> None:
    """Remove the pid file if it still names this process (a newer instance may own it now)."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="ascii").strip()) == os.getpid():
            path.unlink()


def _is_confedge(pid: int) -> bool:
    """Whether `pid` runs `confedge run` or `confedge demo` (console script or -m confedge)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    for i, arg in enumerate(argv):
        # .../bin/confedge (run directly, or by an interpreter), or python -m confedge.
        launcher = (i <= 1 and arg.rsplit(b"/", 1)[-1] == b"confedge") or (
            arg == b"confedge" and i > 0 and argv[i - 1] == b"-m"
        )
        if launcher and argv[i + 1 : i + 2] in ([b"run"], [b"demo"]):
            return True
    return False


def running_pid(state_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the confedge running with this state_dir, or None (no file, stale file)."""
    try:
        pid = int((Path(state_dir) / PID_NAME).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    if pid <= 1 or pid == os.getpid() or not _is_confedge(pid):
        return None
    return pid


def signal_running(state_dir: str | os.PathLike[str], sig: signal.Signals) -> int | None:
    """Send `sig` to the running confedge of this state_dir; its pid, or None if none runs.
    PermissionError goes to the caller (another user's process)."""
    pid = running_pid(state_dir)
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid
