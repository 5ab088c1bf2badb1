"""`confedge --version`: the version, then which implementation of each dual part runs here.

Why: after an install an operator (and install.sh) must see at once whether the compiled proxy,
the libnghttp2 engine, the native TURN data plane and the eBPF offload were built, with the
reason when one was not, rather than find out from throughput or the start-up log.
"""

from __future__ import annotations

import subprocess
import sys

from confedge import __version__
from confedge.cli import version_lines
from confedge.proxy import build_kind, h1engine, h2engine
from confedge.turn import native


def test_version_lines_name_each_part_and_why_a_native_one_is_missing() -> None:
    lines = version_lines()
    assert lines[0].startswith(f"confedge {__version__} (Python ")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "proxy hot path",
        "HTTP/1.1 heads",
        "HTTP/2 framing",
        "TURN data plane",
        "eBPF relay offload",
    ]
    assert lines[1] == f"proxy hot path: {build_kind()}"
    h1_ok, h1_why = h1engine.native_available()
    assert (
        lines[2] == "HTTP/1.1 heads: C fast path for ordinary heads, httptools for the rest"
        if h1_ok
        else h1_why in lines[2]
    )
    h2_ok, h2_why = h2engine.native_available()
    assert lines[3].startswith("HTTP/2 framing: libnghttp2 ") if h2_ok else h2_why in lines[3]
    turn_ok, turn_why = native.native_available()
    assert (
        lines[4] == "TURN data plane: native (C relay threads)" if turn_ok else turn_why in lines[4]
    )


def test_the_command_prints_them_and_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "confedge.cli", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == version_lines()
