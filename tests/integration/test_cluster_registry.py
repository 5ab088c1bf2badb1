"""The cluster registry against a real redis-server: REST secret fingerprints, drain state, and
what happens when Redis goes away and comes back (docs/SCALING.md "When Redis is unreachable")."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guard_redis import RedisServer, free_port, redis_server

from confedge.cluster.service import ClusterService
from confedge.config import Config, ConfigError, parse_config


@dataclass
class FakeRuntime:
    """What ClusterService reads from a Runtime: no TURN here (test_cluster.py has real ones)."""

    cfg: Config
    state: str = "serving"
    turn: Any = None


def _cfg(url: str, name: str, secret: str = "s") -> Config:
    return parse_config(
        {
            "proxy": {"enabled": False},
            "turn": {"enabled": False, "mode": "permissive", "secrets": [secret]},
            "cluster": {"store": url, "instance": name, "interval": 0.2, "ttl": 1.0},
        }
    )


def _service(cfg: Config) -> ClusterService:
    return ClusterService(cfg, FakeRuntime(cfg))


async def _until(cond: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.05)


def _view(svc: ClusterService) -> dict[str, dict[str, Any]]:
    return {i["instance"]: i for i in svc.snapshot()["instances"]}


def test_secret_mismatch_and_drain_state_are_seen_by_the_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main(redis: RedisServer) -> None:
        ra = FakeRuntime(_cfg(redis.url, "edge-a", "new-secret"))
        rb = FakeRuntime(_cfg(redis.url, "edge-b", "old-secret"))
        a, b = ClusterService(ra.cfg, ra), ClusterService(rb.cfg, rb)
        await a.start()
        await b.start()
        try:
            assert a.nonce_key is not None and a.nonce_key == b.nonce_key
            await _until(lambda: "edge-b" in _view(a) and "edge-a" in _view(b))
            assert _view(a)["edge-b"]["same_secret"] is False
            await asyncio.sleep(0.5)  # more publications: still one warning about edge-b
            warned = [r.getMessage() for r in caplog.records]
            assert sum("instance edge-b has a different current" in m for m in warned) == 1
            assert _view(a)["edge-a"]["same_secret"] is True
            rb.state = "draining"  # what the drain does
            await _until(lambda: _view(a)["edge-b"]["state"] == "draining")
            # edge-b reloads with the new secret first (Runtime.cfg is replaced by a reload).
            rb.cfg = _cfg(redis.url, "edge-b", "new-secret")
            await _until(lambda: _view(a)["edge-b"]["same_secret"] is True)
            # A clean stop leaves the registry at once, not after the TTL.
            await b.close()
            await _until(lambda: "edge-b" not in _view(a), timeout=0.6)
        finally:
            await a.close()
            await b.close()

    with redis_server() as redis:
        asyncio.run(main(redis))


def test_redis_outage_degrades_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "confedge.cluster")

    async def main(redis: RedisServer) -> None:
        a = _service(_cfg(redis.url, "edge-a"))
        b = _service(_cfg(redis.url, "edge-b"))
        await a.start()
        await b.start()
        key = a.nonce_key
        try:
            await _until(lambda: "edge-b" in _view(a) and a.up)
            redis.stop()
            await _until(lambda: not a.up, timeout=5)
            snap = a.snapshot()
            assert snap["store_up"] is False and snap["error"]
            assert "edge-b" in _view(a)  # as of the last contact, not dropped
            assert a.nonce_key == key  # TURN's key never changes under it
            # Redis comes back empty (no persistence): the registry and the nonce key return.
            redis.start()
            await _until(lambda: a.up and b.up and "edge-b" in _view(a), timeout=5)
            c = _service(_cfg(redis.url, "edge-c"))
            await c.start()
            try:
                assert c.nonce_key == key
            finally:
                await c.close()
        finally:
            await a.close()
            await b.close()

    with redis_server() as redis:
        asyncio.run(main(redis))
    text = caplog.text
    assert "cluster: cannot reach" in text and "reachable again" in text
    assert text.count("cluster: cannot reach") <= 2  # once per instance per outage


def test_redis_unreachable_at_start_does_not_stop_the_edge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        svc = _service(_cfg(url, "edge-a"))
        await asyncio.wait_for(svc.start(), 3.0)
        try:
            assert svc.nonce_key is None and not svc.nonce_shared
            await asyncio.sleep(0.5)
            snap = svc.snapshot()
            assert snap["store_up"] is False and snap["nonce_key_shared"] is False
            assert [i["instance"] for i in snap["instances"]] == ["edge-a"]
        finally:
            await svc.close()

    asyncio.run(main())
    assert "unreachable at start" in caplog.text and "438" in caplog.text


def test_a_hung_redis_is_named_and_does_not_hold_up_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops answering without closing the connection (SIGSTOP: a hung server, or a
    path that drops packets): the log and the status page say so, and close() still returns
    within its one-second budget instead of waiting on the stuck connection."""

    async def main(redis: RedisServer) -> None:
        assert redis.proc is not None
        svc = _service(_cfg(redis.url, "edge-a"))
        await svc.start()
        try:
            await _until(lambda: svc.up)
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                await _until(lambda: not svc.up)
                assert svc.snapshot()["error"] == "no answer within 1 s"
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await asyncio.wait_for(svc.close(), 5.0)
                assert loop.time() - t0 < 2.0
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
        finally:
            await svc.close()

    with redis_server() as redis:
        asyncio.run(main(redis))
    assert "(no answer within 1 s)" in caplog.text


def test_malformed_url_is_a_config_error() -> None:
    svc = _service(_cfg("redis://127.0.0.1:notaport/0", "edge-a"))
    with pytest.raises(ConfigError, match=r"cluster\.store"):
        asyncio.run(svc.start())


def _cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confedge", "cluster", "list", "--config", str(cfg_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cluster_list_command(tmp_path: Path) -> None:
    def write(url: str) -> Path:
        path = tmp_path / "edge.toml"
        path.write_text(
            f'[server]\nstate_dir = "{tmp_path}"\n[proxy]\nenabled = false\n'
            f'[turn]\nmode = "permissive"\nsecrets = ["s"]\nport = 0\n'
            f'[cluster]\nstore = "{url}"\ninstance = "edge-cli"\n'
        )
        return path

    async def main(redis: RedisServer) -> None:
        # The CLI runs in a thread, so this loop keeps publishing meanwhile.
        svc = _service(_cfg(redis.url, "edge-a"))
        await svc.start()
        try:
            await _until(lambda: svc.up)
            cfg = write(redis.url)
            res = await asyncio.to_thread(_cli, cfg)
            assert res.returncode == 0, res.stderr
            head, row = res.stdout.splitlines()
            assert head.split() == [
                "instance", "state", "turn", "allocations", "updated", "rest", "secret"
            ]  # fmt: skip
            assert row.split()[:2] == ["edge-a", "serving"] and row.endswith("same")
            res = await asyncio.to_thread(_cli, cfg, "--json")
            assert res.returncode == 0 and json.loads(res.stdout)[0]["instance"] == "edge-a"
        finally:
            await svc.close()  # a clean stop leaves the registry
        assert "no instance has published" in (await asyncio.to_thread(_cli, cfg)).stdout

    with redis_server() as redis:
        asyncio.run(main(redis))
        cfg = write(redis.url)
    res = _cli(cfg)  # redis-server stopped now
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("confedge cluster: redis://127.0.0.1:")
    assert "Traceback" not in res.stderr
    res = _cli(write(""))
    assert res.returncode == 1 and "cluster.store is empty" in res.stderr
