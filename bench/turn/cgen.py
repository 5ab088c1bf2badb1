"""The C load generator and sink (turnload.c): build it at run time, share its counters.

Why at run time: a benchmark is run from a source checkout, and a binary built on the host by
the system compiler needs no packaging. It goes to bench/turn/build/ (gitignored) and is rebuilt
when turnload.c is newer. With no C compiler the bench says so and uses the Python generator.

Counters (sent, delivered packets and bytes, stop flags) live in one file of int64 slots under
/dev/shm, mapped by the orchestrator, the Python workers (forked, so they inherit the map) and
the C processes (by path), so either generator is sampled the same way.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "turnload.c"
# TURNLOAD_BUILD_DIR: another build directory (the tests use a fresh one to see a first build,
# or the fallback when there is no compiler, without touching the shared one).
BUILD = Path(os.environ.get("TURNLOAD_BUILD_DIR") or HERE / "build")
BINARY = BUILD / "turnload"

# Slot layout of the shared counter file.
SINK_STOP, SINK_PACKETS, SINK_BYTES, SEND_STOP, SENT0 = range(5)


def build() -> tuple[Path | None, str]:
    """(path of the built binary, "") or (None, why not) when there is no working compiler."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY, ""
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc):
        return None, f"no C compiler ({cc!r} not on PATH; apt-get install gcc, or set CC)"
    BUILD.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: two runs building at once never see half a binary.
    fd, tmp = tempfile.mkstemp(dir=BUILD, prefix=".turnload-")
    os.close(fd)
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-pthread", "-o", tmp, str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None, f"{cc} failed to build {SOURCE.name}: {proc.stderr.strip()[-500:]}"
    os.replace(tmp, BINARY)
    return BINARY, ""


def calibrate(binary: Path) -> dict[str, float] | str:
    """The host's cost of a bare system call and of one 200-byte loopback UDP datagram sent and
    received (`turnload calib`), in ns, or why it could not be measured.  On a shared VM both
    move by 2-3x between days, and the servers' ratios with them, so each run records them."""
    try:
        proc = subprocess.run(
            [str(binary), "calib"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"turnload calib: {exc}"
    if proc.returncode != 0:
        return f"turnload calib exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    try:
        data = json.loads(proc.stdout)
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, AttributeError, TypeError):
        return f"turnload calib printed {proc.stdout.strip()[:200]!r}"


class Slots:
    """A file of int64 counters shared with forked workers and the C processes."""

    def __init__(self, n_workers: int) -> None:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="confedge-turnload-", dir=directory)
        self.path = path
        size = 8 * (SENT0 + n_workers)
        os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)  # MAP_SHARED: forked children share it
        os.close(fd)
        self.q = memoryview(self._map).cast("q")

    @property
    def counts(self) -> memoryview:
        """[delivered packets, delivered bytes] (the sink's counters)."""
        return self.q[SINK_PACKETS : SINK_BYTES + 1]

    @property
    def sink_stop(self) -> memoryview:
        return self.q[SINK_STOP : SINK_STOP + 1]

    @property
    def stop(self) -> memoryview:
        return self.q[SEND_STOP : SEND_STOP + 1]

    @property
    def sent(self) -> memoryview:
        return self.q[SENT0:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def parse_exit_line(text: str) -> dict[str, float]:
    """The `turnload send|sink key=value ...` line a C process prints when it stops."""
    for line in reversed(text.splitlines()):
        if line.startswith("turnload "):
            return {k: float(v) for k, v in (f.split("=", 1) for f in line.split()[2:])}
    raise RuntimeError(f"turnload printed no summary line: {text[-300:]!r}")
