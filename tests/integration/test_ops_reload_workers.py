"""A certificate reload with proxy worker processes (proxy.workers = 2) reports what the workers
did, through `confedge run` and `confedge reload` as an operator meets them.

Each worker loads the certificate files itself after the main process checked them. A renewal
hook that writes cert and key one after the other can change them in between: a worker that
could not load them logged it, but the reload was reported "reloaded" (answer file, log,
status page) and the workers served different certificates. The workers are held between the
check and their load with SIGSTOP (the main process has written to their command pipes, seen
with FIONREAD), so that the files change exactly there; nothing in confedge is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ops_support import (
    Edge,
    Load,
    bytes_sent,
    edge_config,
    get,
    metrics,
    served_cn,
    start_edge,
    status,
    worker_pids,
    write_cert,
)
from proxy_upstream import Upstream


def _start(tmp_path: Path, nodes: list[str]) -> tuple[Edge, Path, Path]:
    """`confedge run` with two proxy workers serving the certificate "first.example.com"."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_cert(cert, key, "first.example.com")
    text = edge_config(tmp_path, nodes=nodes, workers=2)
    text += f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    return start_edge(tmp_path, text), cert, key


async def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for `cond`, serving the event loop meanwhile (the stand-in nodes run in it)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.02)


async def _served_by_each(edge: Edge, workers: list[int]) -> dict[int, set[str]]:
    """Fresh handshakes until each worker has served at least three: the common names each
    one served (SO_REUSEPORT picks the worker; `ss -p` says which)."""
    seen: dict[int, list[str]] = {pid: [] for pid in workers}
    for _ in range(200):
        pid, cn = await asyncio.to_thread(served_cn, edge.https)
        seen[pid].append(cn)
        if all(len(names) >= 3 for names in seen.values()):
            break
    assert all(len(names) >= 3 for names in seen.values()), seen
    return {pid: set(names) for pid, names in seen.items()}


def _continue(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_a_worker_that_cannot_load_the_new_certificate_refuses_the_reload(
    tmp_path: Path,
) -> None:
    """The new files are complete when the main process checks them and when worker B loads
    them, but the key is empty when worker A loads it. The reload is refused for the
    certificate, naming worker A and why; B goes back to the old certificate, so that both
    serve it; the node list edited in the same file is not applied. Once the files are whole
    again, the next reload takes everything in both workers."""
    n1, n2 = await Upstream("n1").start(), await Upstream("n2").start()
    edge, cert, key = _start(tmp_path, [n1.address])
    a, b = worker_pids(edge.proc.pid)
    try:
        assert await _served_by_each(edge, [a, b]) == {
            a: {"first.example.com"},
            b: {"first.example.com"},
        }
        text = edge.config.read_text()
        edge.config.write_text(
            text.replace(f'nodes = ["{n1.address}"]', f'nodes = ["{n2.address}"]')
        )
        write_cert(cert, key, "second.example.com")
        os.kill(a, signal.SIGSTOP)
        os.kill(b, signal.SIGSTOP)
        asked = asyncio.create_task(asyncio.to_thread(edge.confedge, "reload"))
        # The main process checked the files and wrote the new [tls] section to both workers.
        await _until(
            lambda: bytes_sent(edge.proc.pid, a) > 0 and bytes_sent(edge.proc.pid, b) > 0,
            "nothing sent to a worker",
        )
        key.write_bytes(b"")  # the renewal hook has opened the key file for writing
        os.kill(a, signal.SIGCONT)
        refusal = f"confedge.proxy[{a}] ERROR certificate not reloaded in this worker"
        await _until(
            lambda: refusal in edge.log.read_text(), "worker A did not refuse the empty key"
        )
        write_cert(cert, key, "second.example.com")  # the hook is done
        os.kill(b, signal.SIGCONT)
        out = await asyncio.wait_for(asked, 20)
        said = out.stdout + out.stderr
        assert out.returncode == 1, said
        assert said.startswith(
            "confedge: reload refused, the running configuration stays: proxy: certificate not "
            "reloaded, the old one stays in service: 1 of 2 workers could not load it (worker "
        ), said
        assert f"(pid {a}): tls.key" in said and f"(pid {b})" not in said, said
        assert "the 1 that had loaded it went back to the old one" in said, said
        assert "reload again once it is complete" in said, said
        reload = status(edge.admin)["reload"]
        assert reload["ok"] is False and f"(pid {a}): tls.key" in reload["reason"], reload
        assert metrics(edge.admin)["confedge_config_last_reload_successful"][0].value == 0
        # B loaded "second" and went back: both serve "first"; the nodes are the old ones.
        assert f"confedge.proxy[{b}] WARNING proxy worker: back to the previous certificate" in (
            edge.log.read_text()
        )
        assert await _served_by_each(edge, [a, b]) == {
            a: {"first.example.com"},
            b: {"first.example.com"},
        }
        for _ in range(6):
            assert (await get(edge.https, "/x"))[1].get("x-node") == "n1"

        # The files whole: the next reload takes the certificate and the nodes in both workers.
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded the running confedge" in out.stdout, out
        assert status(edge.admin)["reload"]["ok"] is True
        assert await _served_by_each(edge, [a, b]) == {
            a: {"second.example.com"},
            b: {"second.example.com"},
        }
        for _ in range(6):
            assert (await get(edge.https, "/x"))[1].get("x-node") == "n2"
    finally:
        _continue([a, b])
        log = edge.stop()
        await n1.kill()
        await n2.kill()
    assert "Traceback" not in log, log[-3000:]


async def test_a_certificate_reload_reaches_every_worker_and_says_so(tmp_path: Path) -> None:
    """The ordinary case: `confedge reload` says reloaded only after both workers loaded the
    new certificate, and each of them (told apart with `ss -p`) serves it at once."""
    node = await Upstream("n1").start()
    edge, cert, key = _start(tmp_path, [node.address])
    a, b = worker_pids(edge.proc.pid)
    try:
        write_cert(cert, key, "second.example.com")
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded the running confedge" in out.stdout, out
        # No waiting: the answer came after both workers had loaded it.
        assert await _served_by_each(edge, [a, b]) == {
            a: {"second.example.com"},
            b: {"second.example.com"},
        }
        log = edge.log.read_text()
        for pid in (a, b):
            assert f"confedge.tls[{pid}] INFO TLS certificate reloaded: CN=second" in log, log
        reload = status(edge.admin)["reload"]
        assert reload["ok"] is True and reload["reason"] == "", reload
    finally:
        log = edge.stop()
        await node.kill()
    assert "Traceback" not in log, log[-3000:]


async def test_a_worker_that_does_not_answer_is_named_and_its_late_answer_not_taken(
    tmp_path: Path,
) -> None:
    """A worker stopped (hung) during a reload: the answer comes after the bound (5 s) and
    names it. Its late answer to that reload (a refusal: the key was emptied meanwhile) is not
    taken for the next reload's, which is whole: both workers answer that one and serve it."""
    node = await Upstream("n1").start()
    edge, cert, key = _start(tmp_path, [node.address])
    a, b = worker_pids(edge.proc.pid)
    try:
        write_cert(cert, key, "second.example.com")
        os.kill(a, signal.SIGSTOP)
        t0 = time.monotonic()
        out = await asyncio.to_thread(edge.confedge, "reload")
        took = time.monotonic() - t0
        said = out.stdout + out.stderr
        assert out.returncode == 1, said
        assert re.match(
            "confedge: reload applied only in part: proxy: new certificate not confirmed: "
            rf"worker [01] \(pid {a}\) did not answer within 5 s \(reload again\)$",
            said.strip(),
        ), said
        assert 4.5 < took < 9, took
        assert status(edge.admin)["reload"]["ok"] is False
        # Late, worker A reads that reload's [tls] section when the key is empty: it refuses.
        key.write_bytes(b"")
        os.kill(a, signal.SIGCONT)
        refusal = f"confedge.proxy[{a}] ERROR certificate not reloaded in this worker"
        await _until(lambda: refusal in edge.log.read_text(), "worker A did not refuse")
        write_cert(cert, key, "third.example.com")
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded the running confedge" in out.stdout, out
        assert await _served_by_each(edge, [a, b]) == {
            a: {"third.example.com"},
            b: {"third.example.com"},
        }
    finally:
        _continue([a])
        log = edge.stop()
        await node.kill()
    assert "Traceback" not in log, log[-3000:]


async def test_a_worker_restarted_during_a_reload_does_not_count_against_it(
    tmp_path: Path,
) -> None:
    """A worker killed after the new [tls] section was sent to it, before it read it: the
    supervisor starts a new process with the new section, which never sees that reload's
    message. The reload waits for it (within the bound) and is reported whole; the new
    process serves the new certificate."""
    node = await Upstream("n1").start()
    edge, cert, key = _start(tmp_path, [node.address])
    a, b = worker_pids(edge.proc.pid)
    try:
        write_cert(cert, key, "second.example.com")
        os.kill(a, signal.SIGSTOP)
        asked = asyncio.create_task(asyncio.to_thread(edge.confedge, "reload"))
        await _until(lambda: bytes_sent(edge.proc.pid, a) > 0, "nothing sent to worker A")
        os.kill(a, signal.SIGKILL)
        out = await asyncio.wait_for(asked, 20)
        assert "reloaded the running confedge" in out.stdout, (out, edge.log.read_text())
        (restarted,) = set(worker_pids(edge.proc.pid)) - {b}
        assert await _served_by_each(edge, [restarted, b]) == {
            restarted: {"second.example.com"},
            b: {"second.example.com"},
        }
        assert "restarting" in edge.log.read_text()
    finally:
        log = edge.stop()
        await node.kill()
    assert "Traceback" not in log, log[-3000:]


async def test_a_stop_during_a_reload_answers_the_waiting_command(tmp_path: Path) -> None:
    """SIGTERM while a reload waits for a stopped worker: the stop goes on (exit 0) and the
    `confedge reload` waiting for the outcome is told the reload was not finished, instead of
    nothing for 10 s."""
    node = await Upstream("n1").start()
    edge, _cert, _key = _start(tmp_path, [node.address])
    a, _b = worker_pids(edge.proc.pid)
    try:
        os.kill(a, signal.SIGSTOP)
        asked = asyncio.create_task(asyncio.to_thread(edge.confedge, "reload"))
        await _until(lambda: bytes_sent(edge.proc.pid, a) > 0, "nothing sent to worker A")
        edge.proc.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(asked, 20)
        assert out.returncode == 1, out
        assert out.stdout.strip() == (
            "confedge: reload refused, the running configuration stays: confedge is stopping: "
            "reload not finished"
        ), out
        assert await asyncio.to_thread(edge.proc.wait, 20) == 0
    finally:
        _continue([a])
        log = edge.stop()
        await node.kill()
    assert "Traceback" not in log, log[-3000:]


async def test_200_sighups_in_2_s_with_two_workers_under_load(tmp_path: Path) -> None:
    """SIGHUPs faster than reloads end (each waits for both workers): they never overlap, no
    request fails, the process serves on, and a `confedge reload` afterwards gets its own
    answer; every worker serves the certificate of the last reload."""
    node = await Upstream("n1").start()
    edge, cert, key = _start(tmp_path, [node.address])
    a, b = worker_pids(edge.proc.pid)
    load = Load(edge.https, rate=60, connections=2)
    loading = asyncio.create_task(load.run(60))
    try:
        await asyncio.sleep(0.5)
        write_cert(cert, key, "second.example.com")
        for _ in range(200):
            edge.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.01)
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded the running confedge" in out.stdout, out
        assert edge.proc.poll() is None
        # The storm's reloads have ended (that answer came after the last of them): files
        # rewritten now are read by the next reload only.
        write_cert(cert, key, "third.example.com")
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded the running confedge" in out.stdout, out
        assert await _served_by_each(edge, [a, b]) == {
            a: {"third.example.com"},
            b: {"third.example.com"},
        }
        load.running = False
        await loading
        assert load.failed == [], load.failed[:5]
        assert load.ok > 50
    finally:
        load.running = False
        with contextlib.suppress(Exception):
            await loading
        log = edge.stop()
        await node.kill()
    assert "Traceback" not in log, log[-3000:]
    reloads = log.count("configuration reloaded from")
    assert 2 <= reloads <= 202, reloads
    assert "ERROR" not in log, [ln for ln in log.splitlines() if "ERROR" in ln][:5]
