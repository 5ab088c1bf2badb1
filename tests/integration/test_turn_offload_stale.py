"""A relay TC filter left behind by a killed confedge is removed on the next start (issue 17).

Why: SIGKILL (or a crash) skips the detach, and the dead process's program stays on the
interface, still forwarding the channels its maps held, for allocations that no longer exist.
The next start with the offload finds such a filter by its program name (any handle and
priority, so an older version's too) and by no process holding the program, removes it, logs
it, and also takes over the empty clsact qdisc the dead process made.  A filter a *running*
confedge owns is never touched.

Everything runs in a network namespace made here (prefix i17gen-), removed afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from confedge.turn.offload import BPF_OBJECT

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and eBPF need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) not installed"),
    pytest.mark.skipif(shutil.which("tc") is None, reason="iproute2 (tc) not installed"),
    pytest.mark.skipif(not BPF_OBJECT.is_file(), reason=f"{BPF_OBJECT} not built (no clang)"),
]

# Attach on the namespace's lo (ifindex 1), optionally at another handle and priority (an older
# version's), say so, and wait to be killed.
HOLDER = """
import sys, time
from confedge.turn import offload
if len(sys.argv) > 1:
    offload._TC_HANDLE = offload._TC_PRIORITY = int(sys.argv[1], 0)
try:
    offload.BpfRelay({"lo": 1})
except offload.OffloadUnavailable as exc:
    print("refused", exc, flush=True)
    sys.exit(0)
print("attached", flush=True)
time.sleep(60)
"""

# A fresh start: attach (logging to stdout), report the filters while attached, stop cleanly,
# report what is left.
RESTART = """
import json, logging, subprocess, sys
from confedge.turn import offload
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="LOG %(message)s")
def filters():
    out = subprocess.run(["tc", "-j", "filter", "show", "dev", "lo", "ingress"],
                         capture_output=True, text=True, check=True).stdout
    return [f["options"]["prog"]["id"] for f in json.loads(out or "[]")
            if f.get("options", {}).get("prog", {}).get("name") == "confedge_relay"]
relay = offload.BpfRelay({"lo": 1})
attached = filters()
relay.close()
qdiscs = subprocess.run(["tc", "-j", "qdisc", "show", "dev", "lo"],
                        capture_output=True, text=True, check=True).stdout
print(json.dumps({"attached": attached, "after_close": filters(),
                  "qdiscs": [q["kind"] for q in json.loads(qdiscs or "[]")]}))
"""


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"i17gen-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _holder(ns: str, *args: str) -> subprocess.Popen[str]:
    """A confedge-like process with the relay attached in `ns` (ip netns exec execs it)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", HOLDER, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line.startswith("refused"):
        pytest.skip(f"the kernel refused the BPF program: {line}")
    assert line == "attached", line
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _confedge_filters(ns: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "-j", "filter", "show", "dev", "lo", "ingress"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        f["options"]["prog"]["id"]
        for f in json.loads(out or "[]")
        if f.get("options", {}).get("prog", {}).get("name") == "confedge_relay"
    ]


def _restart(ns: str) -> tuple[dict[str, list[int] | list[str]], list[str]]:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", RESTART],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return json.loads(lines[-1]), [ln for ln in lines if ln.startswith("LOG ")]


def test_stale_filters_of_killed_runs_are_removed(ns: str) -> None:
    # Two runs killed together: one at another handle/priority (an older version's), one at
    # today's (both alive at once: a start removes only filters nobody holds).
    holders = [_holder(ns, "0x77"), _holder(ns)]
    for proc in holders:
        _kill(proc)
    stale = _confedge_filters(ns)
    assert len(stale) == 2, stale  # the defect: SIGKILL left both attached

    report, logs = _restart(ns)

    removed = [ln for ln in logs if "removed a stale confedge TC filter from lo" in ln]
    assert len(removed) == 2, logs
    assert all(any(f"program id {i}," in ln for ln in removed) for i in stale), (stale, logs)
    # While running, only the new program is attached; after a clean stop nothing is left,
    # not even the dead run's clsact qdisc.
    (attached,) = report["attached"]
    assert attached not in stale
    assert report["after_close"] == []
    assert "clsact" not in report["qdiscs"], report


def test_a_running_confedges_filter_is_left_alone(ns: str) -> None:
    live = _holder(ns, "0x77")
    try:
        (live_id,) = _confedge_filters(ns)
        report, logs = _restart(ns)
        assert not [ln for ln in logs if "removed a stale" in ln], logs
        assert any("held by running process(es)" in ln and str(live.pid) in ln for ln in logs), logs
        assert live_id in report["attached"] and len(report["attached"]) == 2, report
        assert report["after_close"] == [live_id]  # still there, still its owner's
        assert "clsact" in report["qdiscs"]  # not ours to remove
    finally:
        _kill(live)
