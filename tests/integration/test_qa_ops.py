"""Adversarial operations (docs/QA.md "operations"): signals that arrive while `confedge run`
stops, and a certificate that changes while a reload reads it.

Both were found against a real `confedge run`: a SIGHUP (a renewal hook's `confedge cert
install`), SIGUSR1 or SIGUSR2 during the stop killed the process by the signal's default action
(guard not flushed, pid file left, exit status 129/138/140); and a certificate rewritten between
the reload's check and the parts' loading left the proxy on the old certificate with every
other setting applied, reported as "reloaded"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import websockets
from admin_support import parse_replies, raw
from guard_redis import RedisServer, free_port
from ops_support import edge_config, start_edge, tls_client, write_cert
from proxy_upstream import Upstream

from confedge.config import Config, load_config, parse_config
from confedge.runtime import Runtime
from confedge.tls.certs import CertificateError


async def test_reload_drain_and_stop_signals_during_the_stop_are_ignored(tmp_path: Path) -> None:
    node = await Upstream("n1").start()
    edge = start_edge(tmp_path, edge_config(tmp_path, nodes=[node.address]))
    try:
        # A WebSocket keeps the proxy's stop busy for its grace (2 s): time for the signals.
        ws = await websockets.connect(f"wss://127.0.0.1:{edge.https}/ws", ssl=tls_client())
        edge.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "SIGTERM received, stopping" not in edge.log.read_text():
            assert time.monotonic() < deadline, edge.log.read_text()
            time.sleep(0.02)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            edge.proc.send_signal(sig)
            time.sleep(0.05)
        assert edge.proc.wait(timeout=20) == 0, edge.log.read_text()
        await ws.close()
    finally:
        text = edge.stop()
        await node.kill()
    assert "guard stopped" in text, text
    assert "SIGHUP ignored: stopping" in text, text
    assert not (edge.state / "confedge.pid").exists()
    assert "Traceback" not in text, text


class _Part:
    """A running part that records what a reload hands it; `refuse` makes its certificate
    load fail as when the file changed after the reload's check."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[str] = []

    def reload_tls(self, cfg: Config) -> None:
        if self.refuse:
            raise CertificateError("tls.key (key.pem): the file is empty")
        self.calls.append("reload_tls")

    def reload_config(self, cfg: Config) -> None:
        self.calls.append("reload_config")

    def reload(self, cfg: Config) -> None:
        self.calls.append("reload")


def _runtime(tmp_path: Path) -> tuple[Runtime, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_cert(cert, key, "edge.example.com")
    path = tmp_path / "confedge.toml"
    path.write_text(
        edge_config(tmp_path, nodes=["http://127.0.0.1:9"])
        + f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    )
    rt = Runtime(load_config(path))
    rt.config_path = str(path)
    (tmp_path / "state").mkdir()
    return rt, path


def _result(tmp_path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((tmp_path / "state" / "confedge.reload").read_text())
    return out


def test_a_certificate_refused_by_the_proxy_during_a_reload_changes_nothing(
    tmp_path: Path,
) -> None:
    rt, path = _runtime(tmp_path)
    old = rt.cfg
    guard, proxy, turn = _Part(), _Part(refuse=True), _Part()
    rt.guard, rt.proxy, rt.turn = guard, proxy, turn
    path.write_text(path.read_text().replace("health_interval = 0.5", "health_interval = 2"))
    asyncio.run(rt.reload_and_wait())
    assert rt.cfg is old
    assert guard.calls == proxy.calls == turn.calls == []
    result = _result(tmp_path)
    assert result["ok"] is False
    assert "proxy: certificate not reloaded, the old one stays in service" in result["reason"]
    assert "reload again" in result["reason"]

    # The file complete again: the next reload applies everything.
    proxy.refuse = False
    asyncio.run(rt.reload_and_wait())
    assert _result(tmp_path)["ok"] is True
    assert rt.cfg.proxy.health_interval == 2
    assert guard.calls == ["reload"]
    assert proxy.calls == turn.calls == ["reload_tls", "reload_config"]


def test_a_part_that_fails_after_the_check_is_reported_not_hidden(tmp_path: Path) -> None:
    rt, _ = _runtime(tmp_path)
    proxy, turn = _Part(), _Part(refuse=True)
    rt.proxy, rt.turn = proxy, turn
    asyncio.run(rt.reload_and_wait())
    result = _result(tmp_path)
    assert result["ok"] is False
    assert "turn: certificate not reloaded" in result["reason"]
    assert "proxy took the new one" in result["reason"]
    assert proxy.calls == ["reload_tls"]


async def test_management_answers_only_http_1x(tmp_path: Path) -> None:
    """docs/MANAGEMENT.md: "anything not HTTP/1.x 400"; httptools parses HTTP/2.0 and
    HTTP/0.9 request lines, which were answered 200."""
    cfg = parse_config(
        {
            "server": {"hostname": "mgmt", "domain": "example.test", "state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "management": {"port": 0},
        }
    )
    rt = Runtime(cfg)
    await rt.start()
    try:
        port = rt.admin.port
        for version in ("2.0", "0.9", "3.0"):
            line = f"GET /healthz HTTP/{version}\r\nHost: localhost\r\n\r\n".encode()
            assert parse_replies(await raw(port, line))[0].status == 400, version
        for version in ("1.0", "1.1"):
            line = f"GET /healthz HTTP/{version}\r\nHost: localhost\r\n\r\n".encode()
            assert parse_replies(await raw(port, line))[0].status == 200, version
    finally:
        await rt.close()


class _NotRedis:
    """Something on the Redis port that answers `:42` (an integer reply) to every read: a
    wrong-typed answer the client library does not expect (to HELLO, to PING)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                writer.write(b":42\r\n")
        writer.close()

    async def __aenter__(self) -> _NotRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:  # Python 3.11: no Server.close_clients()
            writer.transport.abort()
        await self.server.wait_closed()


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_redis_that_answers_garbage_degrades_the_guard_and_cluster_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis replaced by something answering wrong-typed replies, then back: the guard said
    "guard sync failed" with a traceback four times a second, and the cluster registry's task
    died silently (never published again, even with Redis back)."""
    from confedge.cluster.service import ClusterService
    from confedge.guard import Guard
    from confedge.guard.redis_store import RedisStore

    caplog.set_level(logging.INFO)
    srv = RedisServer(free_port())
    srv.start()
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False, "mode": "permissive", "secrets": ["s"]},
            "guard": {"enabled": True, "store": srv.url},
            "cluster": {"store": srv.url, "instance": "edge-a", "interval": 0.2, "ttl": 1.0},
        }
    )
    guard = Guard(cfg.guard, RedisStore(srv.url))
    cluster = ClusterService(cfg, SimpleNamespace(cfg=cfg, state="serving", turn=None))
    try:
        await guard.start()
        await cluster.start()
        await _until(lambda: cluster.up and guard.store_ok)
        srv.stop()
        async with _NotRedis(srv.port):
            await _until(lambda: not cluster.up and not guard.store_ok)
            await asyncio.sleep(1.5)  # several guard syncs and cluster publications
        srv.start()
        await _until(lambda: cluster.up and guard.store_ok)
    finally:
        await cluster.close()
        await guard.close()
        srv.stop()
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = caplog.text
    assert "guard store redis:redis://" in text and "reachable again" in text
    assert "cluster: redis://" in text and "reachable again" in text
