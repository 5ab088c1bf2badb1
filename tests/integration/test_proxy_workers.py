"""Worker processes: SO_REUSEPORT spreads connections over them; a killed worker is restarted."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import uvloop
from proxy_upstream import Upstream, get, proxy_config

from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def _gone(pid: int) -> None:
    """Wait (at most 10 s) until `pid` has exited: a zombie (not yet reaped) or no process."""
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pid {pid} still running 10 s after SIGKILL")


async def test_two_workers_share_the_port_and_restart(tmp_path):
    node = await Upstream("n0").start()
    procs: list = []
    svc = ProxyService(
        proxy_config([node.address], str(tmp_path), workers=2, health_interval=1, health_timeout=5)
    )
    try:
        await svc.start()
        pids = [p.pid for p in svc._procs]
        assert len(set(pids)) == 2
        before = {pid: cpu_ticks(pid) for pid in pids}
        # new connections (a TLS handshake each) are spread by the kernel over both workers
        results = await asyncio.gather(*(get(svc.https_port, f"/echo?{i}") for i in range(120)))
        assert all(r.status == 200 for r in results)
        used = [pid for pid in pids if cpu_ticks(pid) > before[pid]]
        assert len(used) == 2, "only one worker served"
        # a crashed worker: the other keeps serving, the supervisor starts a new one
        os.kill(pids[0], signal.SIGKILL)
        # Until the kernel has closed the killed worker's socket, it stays in the SO_REUSEPORT
        # group and a new connection can still be queued on it, then reset (CI saw exactly
        # that). The product cannot save those (docs/CONFIGURATION.md, `workers`); what it
        # must do is serve every connection after that on the other worker.
        await _gone(pids[0])
        for _ in range(20):
            assert (await get(svc.https_port, "/echo")).status == 200
        for _ in range(100):
            if svc._procs[0].pid != pids[0] and svc._procs[0].is_alive():
                break
            await asyncio.sleep(0.1)
        assert svc._procs[0].pid != pids[0] and svc._procs[0].is_alive()
        for _ in range(10):
            assert (await get(svc.https_port, "/echo")).status == 200
        procs = list(svc._procs)
    finally:
        await svc.close()
        await node.kill()
    assert procs and all(p.exitcode == 0 for p in procs)  # SIGTERM: drained and exited cleanly
