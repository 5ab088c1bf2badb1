"""`confedge reload` of every reloadable part, each under live traffic (issue 15, "Reload
everything"): a loop of proxied keep-alive requests and a relaying TURN allocation run through
every reload, and not one request fails nor one relayed datagram is lost. A file that does not
validate, or that changes what only a restart can change, is refused with the reason and the
service goes on unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from ops_support import (
    HOST,
    Edge,
    Load,
    Relay,
    accepting_pid,
    admin_get,
    admin_raw,
    edge_config,
    get,
    metrics,
    peer_cn,
    read_response,
    start_edge,
    status,
    tls_client,
    write_cert,
)
from proxy_upstream import Upstream

from confedge.config import parse_config
from confedge.runtime import restart_only_changes
from confedge.turn.auth import RestCredentials


class Traffic:
    """The live traffic every reload runs under: keep-alive load and one relaying allocation
    checked every 0.2 s (a lock lets a step use the allocation's client in between)."""

    def __init__(self, edge: Edge, relay: Relay) -> None:
        self.load = Load(edge.https, rate=60, connections=2)
        self.relay = relay
        self.lock = asyncio.Lock()
        self.relayed = 0
        self.lost = 0
        self.running = True
        self.tasks = [
            asyncio.create_task(self.load.run(120)),
            asyncio.create_task(self._relay_loop()),
        ]

    async def _relay_loop(self) -> None:
        while self.running:
            async with self.lock:
                if await self.relay.check():
                    self.relayed += 1
                else:
                    self.lost += 1
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.running = False
        self.load.running = False
        await asyncio.gather(*self.tasks)


async def _reload(edge: Edge, old: str, new: str) -> str:
    """Edit the file (replace `old` by `new`) and `confedge reload`; its output."""
    text = edge.config.read_text()
    assert old in text, old
    edge.config.write_text(text.replace(old, new, 1))
    out = await asyncio.to_thread(edge.confedge, "reload")
    return out.stdout + out.stderr


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 10
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_reload_every_part_under_live_traffic(tmp_path: Path) -> None:
    n1, n2 = await Upstream("n1").start(), await Upstream("n2").start()
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("static hello\n")
    text = edge_config(tmp_path, nodes=[n1.address], extra="csp_policy = \"default-src 'self'\"")
    text = text.replace('media_nodes = ["127.0.0.0/8"]', 'media_nodes = ["127.0.0.1/32"]')
    text += '\nnetworks = ["127.0.0.1/32"]\n[guard]\nenabled = true\nmaxretry = 10\n'
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_cert(cert, key, "first.example.com")
    text += f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    edge = start_edge(tmp_path, text)
    relay = Relay(edge.turn)
    traffic: Traffic | None = None
    try:
        assert await relay.open() == 200
        traffic = Traffic(edge, relay)
        await asyncio.sleep(0.5)

        # Node list: a second node takes requests.
        out = await _reload(
            edge, f'nodes = ["{n1.address}"]', f'nodes = ["{n1.address}", "{n2.address}"]'
        )
        assert "reloaded the running confedge" in out, out

        async def both_nodes() -> bool:
            seen = {(await get(edge.https, "/x"))[1].get("x-node") for _ in range(6)}
            return seen == {"n1", "n2"}

        await _eventually(both_nodes, "the new node never got a request")

        # Balancing: ip-hash sends one client to one node.
        out = await _reload(
            edge, "health_interval = 0.5", 'health_interval = 0.5\nbalance = "ip-hash"'
        )
        assert "reloaded" in out, out
        assert len({(await get(edge.https, "/x"))[1].get("x-node") for _ in range(8)}) == 1

        # Static content and CSP.
        out = await _reload(
            edge,
            "csp_policy = \"default-src 'self'\"",
            "csp_policy = \"default-src 'none'\"\n"
            f'static = [{{ prefix = "/branding/", path = "{site}" }}]',
        )
        assert "reloaded" in out, out
        st, _, body = await get(edge.https, "/branding/hello.txt")
        assert (st, body) == (200, b"static hello\n")
        assert (await get(edge.https, "/x"))[1]["content-security-policy"] == "default-src 'none'"

        # Guard thresholds: two wrong PINs now ban (was ten).
        out = await _reload(edge, "maxretry = 10", "maxretry = 2")
        assert "reloaded" in out, out
        pin = "/api/client/v2/conferences/meet/request_token"
        statuses = [
            (await get(edge.https, pin, method="POST", extra="pin: 9\r\n", source="127.0.0.3"))[0]
            for _ in range(4)
        ]
        assert statuses[:2] == [403, 403] and statuses[-1] == 429, statuses

        # Management networks: 127.0.0.3 may read the status page after the reload.
        assert await asyncio.to_thread(admin_raw, edge.admin, "/healthz", "127.0.0.3") == b""
        out = await _reload(
            edge, 'networks = ["127.0.0.1/32"]', 'networks = ["127.0.0.1/32", "127.0.0.3/32"]'
        )
        assert "reloaded" in out, out
        answer = await asyncio.to_thread(admin_raw, edge.admin, "/healthz", "127.0.0.3")
        assert answer.startswith(b"HTTP/1.1 200"), answer

        # Media node safelist and peer policy: 127.0.0.4 may allocate, 127.0.0.2 is a peer.
        probe = Relay(edge.turn, source="127.0.0.4")
        assert await probe.open() == 403
        probe.close()
        out = await _reload(
            edge,
            'media_nodes = ["127.0.0.1/32"]\nallowed_peers = ["127.0.0.1/32"]',
            'media_nodes = ["127.0.0.1/32", "127.0.0.4/32"]\n'
            'allowed_peers = ["127.0.0.1/32", "127.0.0.2/32"]',
        )
        assert "reloaded" in out, out
        probe = Relay(edge.turn, source="127.0.0.4")
        assert await probe.open(peer="127.0.0.2") == 200
        probe.close()

        # Quotas: one allocation at most; the live one keeps relaying, a new one is refused.
        out = await _reload(
            edge, 'password = "turnpass"', 'password = "turnpass"\nmax_allocations = 1'
        )
        assert "reloaded" in out, out
        probe = Relay(edge.turn)
        assert await probe.open() in (486, 508)
        probe.close()
        out = await _reload(edge, "max_allocations = 1", "max_allocations = 100")
        assert "reloaded" in out, out

        # TURN credentials: the new password allocates, the old one no longer does, and the
        # live allocation made with the old one keeps relaying and can still be refreshed.
        out = await _reload(edge, 'password = "turnpass"', 'password = "rotated"')
        assert "reloaded" in out, out
        fresh = Relay(edge.turn, password="rotated")
        assert await fresh.open() == 200
        fresh.close()
        stale = Relay(edge.turn, password="turnpass")
        assert await stale.open() == 401
        stale.close()
        async with traffic.lock:
            assert await relay.refresh(600) == 200

        # Certificates: new files at [tls] cert/key are served to new connections (the load's
        # keep-alive connections go on with their sessions).
        assert await asyncio.to_thread(peer_cn, edge.https) == "first.example.com"
        write_cert(cert, key, "second.example.com")
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded" in out.stdout + out.stderr, out
        assert await asyncio.to_thread(peer_cn, edge.https) == "second.example.com"

        # Refused: a restart-only key (named), then a file that does not validate (SIGHUP).
        before = await asyncio.to_thread(status, edge.admin)
        https = f"https_port = {edge.https}"
        out = await _reload(edge, https, "https_port = 1")
        assert "reload refused" in out and "proxy.https_port" in out, out
        edge.config.write_text(edge.config.read_text().replace("https_port = 1", https))
        good = edge.config.read_text()
        edge.config.write_text(good.replace("maxretry = 2", "maxretry = -1"))
        pid = int((edge.state / "confedge.pid").read_text())
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert "configuration not reloaded, the running one stays: guard.maxretry" in (
            edge.log.read_text()
        )
        after = await asyncio.to_thread(status, edge.admin)
        assert after["config"] == before["config"]
        assert before["reload"]["ok"] is True
        assert after["reload"]["ok"] is False
        assert after["reload"]["reason"].startswith("guard.maxretry: -1")
        fams = await asyncio.to_thread(metrics, edge.admin)
        (ok,) = fams["confedge_config_last_reload_successful"]
        assert ok.value == 0
        page = (await asyncio.to_thread(admin_get, edge.admin, "/status")).decode()
        assert "<b>refused</b>" in page and "guard.maxretry" in page
        assert edge.proc.poll() is None

        await asyncio.sleep(0.5)
        await traffic.stop()
        assert traffic.load.failed == [], traffic.load.failed[:5]
        assert traffic.load.ok > 100
        assert traffic.lost == 0 and traffic.relayed > 10, (traffic.lost, traffic.relayed)
        assert "Traceback" not in edge.log.read_text()
    finally:
        if traffic is not None and traffic.running:
            await traffic.stop()
        relay.close()
        edge.stop()
        await n1.kill()
        await n2.kill()


@pytest.mark.parametrize("workers", [2])
async def test_reload_guard_thresholds_reach_every_proxy_worker(
    tmp_path: Path, workers: int
) -> None:
    """Guard thresholds reloaded under keep-alive load with proxy.workers > 1: each worker's
    own guard (ProxyWorker.apply -> Guard.reload) bans after the new maxretry (3, was 10) and
    lifts the ban after the new bantime (2 s, was 300), while not one ordinary request fails.

    The guesses go back to back on one keep-alive connection, so the worker that holds it
    decides on its own count (the main process's guard, which also reads the store, is far too
    slow to ban in between); connections from new addresses are opened until both workers
    (told apart with `ss -p`) have judged one."""
    node = await Upstream("n1").start()
    text = edge_config(tmp_path, nodes=[node.address], workers=workers)
    text += "\n[guard]\nenabled = true\nmaxretry = 10\nbantime = 300\njitter = 0\n"
    edge = start_edge(tmp_path, text)
    guess = (
        f"POST /api/client/v2/conferences/meet/request_token HTTP/1.1\r\nHost: {HOST}\r\n"
        "pin: 9\r\nContent-Length: 0\r\n\r\n"
    ).encode()

    async def guesses(source: str, n: int) -> tuple[int, list[int]]:
        """`n` wrong PINs on one connection from `source`: (worker pid, statuses)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.https, ssl=tls_client(), local_addr=(source, 0)
        )
        try:
            port = writer.get_extra_info("sockname")[1]
            pid = await asyncio.to_thread(accepting_pid, edge.https, port)
            out = []
            for _ in range(n):
                writer.write(guess)
                out.append((await asyncio.wait_for(read_response(reader), 10))[0])
            return pid, out
        finally:
            writer.close()

    load = Load(edge.https, rate=60, connections=2)
    loading = asyncio.create_task(load.run(60))
    try:
        await asyncio.sleep(0.5)
        # The old threshold: four wrong PINs are four 403s from the node, no ban.
        assert (await guesses("127.0.0.2", 4))[1] == [403] * 4
        out = await _reload(edge, "maxretry = 10\nbantime = 300", "maxretry = 3\nbantime = 2")
        assert "reloaded the running confedge" in out, out
        await asyncio.sleep(0.5)  # the command pipe reaches both workers
        judged: set[int] = set()
        for last in range(3, 40):
            pid, statuses = await guesses(f"127.0.0.{last}", 4)
            assert statuses == [403, 403, 403, 429], (pid, statuses)
            judged.add(pid)
            if len(judged) == workers:
                break
        assert len(judged) == workers, judged
        # The new bantime: two seconds later the address reaches the node again.
        await asyncio.sleep(2.5)
        assert (await guesses("127.0.0.3", 1))[1] == [403]
        load.running = False
        await loading
        assert load.failed == [], load.failed[:5]
        assert load.ok > 100
        log = edge.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        load.running = False
        with contextlib.suppress(Exception):
            await loading
        edge.stop()
        await node.kill()


async def test_reload_rotates_rest_secrets_without_refusing_live_allocations(
    tmp_path: Path,
) -> None:
    text = edge_config(tmp_path, nodes=[]).replace("[proxy]", "[proxy]\nenabled = false")
    text = text.replace(
        'username = "turnuser"\npassword = "turnpass"',
        'mode = "permissive"\nsecrets = ["first-secret"]',
    )
    edge = start_edge(tmp_path, text)
    user = f"{int(time.time()) + 3600}:alice"
    old_pw = RestCredentials.password_for("first-secret", user)
    live = Relay(edge.turn, username=user, password=old_pw)
    try:
        assert await live.open() == 200
        assert await live.check()
        out = await _reload(edge, 'secrets = ["first-secret"]', 'secrets = ["second-secret"]')
        assert "reloaded" in out, out
        assert await live.check()
        assert await live.refresh(600) == 200  # the rotated-away secret's allocation lives on
        late = Relay(edge.turn, username=user, password=old_pw, source="127.0.0.5")
        assert await late.open() == 401  # but mints nothing new
        late.close()
        new_pw = RestCredentials.password_for("second-secret", user)
        fresh = Relay(edge.turn, username=user, password=new_pw, source="127.0.0.6")
        assert await fresh.open() == 200
        fresh.close()
    finally:
        live.close()
        edge.stop()


@pytest.mark.parametrize("workers", [2])
async def test_reload_reaches_every_worker(tmp_path: Path, workers: int) -> None:
    """proxy.workers > 1: the new node list and CSP go to each worker over its command pipe."""
    n1, n2 = await Upstream("n1").start(), await Upstream("n2").start()
    edge = start_edge(tmp_path, edge_config(tmp_path, nodes=[n1.address], workers=workers))
    try:
        out = await _reload(
            edge,
            f'nodes = ["{n1.address}"]',
            f'nodes = ["{n2.address}"]\ncsp_policy = "default-src \'none\'"',
        )
        assert "reloaded" in out, out
        # Ten fresh connections spread over both workers: every one goes to n2 with the CSP.
        for _ in range(10):
            _, headers, _ = await get(edge.https, "/x")
            assert headers.get("x-node") == "n2", headers
            assert headers["content-security-policy"] == "default-src 'none'"
    finally:
        edge.stop()
        await n1.kill()
        await n2.kill()


async def test_reload_adds_and_removes_a_node_pool_in_every_worker(tmp_path: Path) -> None:
    """[[proxy.pools]] reload like the node list (WorkerRuntime.install_pools): a pool added by
    `confedge reload` takes its prefix in both workers, other paths stay on proxy.nodes, and
    removing it again sends the prefix back to the default nodes."""
    n1, n2 = await Upstream("n1").start(), await Upstream("n2").start()
    edge = start_edge(tmp_path, edge_config(tmp_path, nodes=[n1.address], workers=2))
    text = edge.config.read_text()
    pool = f'\n[[proxy.pools]]\nprefix = "/scheduling/"\nnodes = ["{n2.address}"]\n'
    try:
        edge.config.write_text(text + pool)
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded" in out.stdout + out.stderr, out
        for _ in range(6):  # fresh connections, spread over both workers
            _, headers, _ = await get(edge.https, "/scheduling/x")
            assert headers.get("x-node") == "n2", headers
            _, headers, _ = await get(edge.https, "/api/x")
            assert headers.get("x-node") == "n1", headers
        edge.config.write_text(text)
        out = await asyncio.to_thread(edge.confedge, "reload")
        assert "reloaded" in out.stdout + out.stderr, out
        for _ in range(6):
            _, headers, _ = await get(edge.https, "/scheduling/x")
            assert headers.get("x-node") == "n1", headers
    finally:
        edge.stop()
        await n1.kill()
        await n2.kill()


def test_commands_say_when_nothing_runs_and_check_the_file_first(tmp_path: Path) -> None:
    """No instance: one clear line and exit 1; a file that does not validate: its problems
    and exit 2, and nothing is signalled."""
    cfg = tmp_path / "confedge.toml"
    cfg.write_text(edge_config(tmp_path, nodes=["http://127.0.0.1:9"]))
    for args in (["drain"], ["drain", "--cancel"], ["reload"]):
        out = subprocess.run(
            [sys.executable, "-m", "confedge", *args, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1, out
        assert "no confedge is running with server.state_dir" in out.stderr
    cfg.write_text(cfg.read_text().replace("health_interval = 0.5", "health_interval = -1"))
    out = subprocess.run(
        [sys.executable, "-m", "confedge", "reload", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("confedge: proxy.health_interval: -1"), out.stderr


def test_restart_only_keys_are_named() -> None:
    base = parse_config({"proxy": {"nodes": ["10.0.0.1"]}, "turn": {"enabled": False}})
    moved = parse_config(
        {
            "proxy": {"nodes": ["10.0.0.2"], "https_port": 8443, "workers": 3},
            "turn": {"enabled": False},
            "server": {"state_dir": "/tmp/elsewhere"},
        }
    )
    assert restart_only_changes(base, moved) == [
        "server.state_dir",
        "proxy.https_port",
        "proxy.workers",
    ]
    assert restart_only_changes(base, base) == []
    # Set up once at start (ALPN list, eBPF program, cluster publisher): refused, not ignored.
    started_once = parse_config(
        {
            "proxy": {"nodes": ["10.0.0.1"], "http2": False, "http2_max_streams": 10},
            "turn": {"enabled": False, "offload": "auto"},
            "cluster": {"interval": 2.0, "ttl": 10.0},
        }
    )
    assert restart_only_changes(base, started_once) == [
        "proxy.http2",
        "proxy.http2_max_streams",
        "turn.offload",
        "cluster.interval",
        "cluster.ttl",
    ]
