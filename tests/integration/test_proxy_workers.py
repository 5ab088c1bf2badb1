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


async def test_a_stop_during_a_worker_restart_still_exits_it_cleanly(tmp_path):
    """A worker restarted just before a stop gets SIGTERM while its interpreter and
    multiprocessing's bootstrap are still starting, before _worker_main has its handler. It is
    born with SIGTERM blocked (ProxyService._spawn), so the signal waits for the handler and
    the worker exits 0; by the default action it died of the signal (exit -15), which is what
    test_two_workers_share_the_port_and_restart met on a loaded host."""
    node = await Upstream("n0").start()
    svc = ProxyService(proxy_config([node.address], str(tmp_path), workers=2))
    try:
        await svc.start()
        first = svc._procs[0]
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        await _gone(first.pid)
        restarted = None
        for _ in range(2000):  # the moment the supervisor has started its successor
            p = svc._procs[0]
            if p is not None and p.pid != first.pid and p.pid is not None:
                restarted = p
                break
            await asyncio.sleep(0.005)
        assert restarted is not None, "worker 0 was not restarted"
        os.kill(restarted.pid, signal.SIGTERM)  # (still in the spawn bootstrap)
        await asyncio.get_running_loop().run_in_executor(None, restarted.join, 10.0)
        assert restarted.exitcode == 0
    finally:
        await svc.close()
        await node.kill()
