"""Issue 5's "done means" on the real demo: a browser call through `confedge demo`.

Everything is the shipped composition, its ports moved as a whole with ``--port-base N``
(proxy N/N+1, TURN N+2/N+3 with relays N+100..N+1099, status N+4, nodes N+5..N+7; the defaults
8443, 3478, 9090, ... stay free for a demo running beside the tests), started in-process
(``Demo(port_base=N)``) or as the real command (``python -m confedge demo --json --port-base
N``). Headless Chromium with a fake camera opens https://127.0.0.1:N/webapp/ and does what a
person does:

1. a wrong PIN shows "Invalid PIN"; the host PIN joins "meet"; the call connects, the browser
   decodes the node's echoed video, and its selected candidate pair's remote candidate is a relay
   candidate on confedge's relay address; confedge's TURN counters show the bytes each way; a
   screenshot goes to ``artifacts/demo_call.png`` (in-process) or ``demo_call_subprocess.png``;
2. the node the proxy sent this browser to (ip-hash; the ``X-Confedge-Node`` header says which)
   is killed (in-process) or put in maintenance (the real command, as docs/DEMO.md tells an
   operator to); a new join, as a guest without a PIN, lands on another node and connects: the
   proxy fails over and the guard counts nothing for it;
3. the same page keeps guessing a wrong PIN: exactly ``maxretry`` (10) wrong PINs in all are
   answered "Invalid PIN", then the guard's 429 reaches the page as "Too many attempts".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chromium_driver import CHROMIUM, assert_loaded_over, require_browser, run_driver

from confedge.demo import DemoPorts
from ports import demo_port_base

pytest.importorskip("aiortc")

pytestmark = pytest.mark.chromium

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAXRETRY = 10  # data/demo.toml guard.maxretry
HOST_PIN = "1234"


def _http(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request, certificate unchecked (the demo's is self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def _status(info: dict[str, Any]) -> dict[str, Any]:
    """The demo's /status.json (its URL from the --json line's "status")."""
    code, _, body = await asyncio.to_thread(_http, info["status"] + ".json")
    assert code == 200, body[:300]
    result: dict[str, Any] = json.loads(body)
    return result


async def _until(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@dataclass
class Running:
    """A started demo, however it was started."""

    variant: str
    info: dict[str, Any]
    turn_stats: Callable[[], Awaitable[dict[str, int]]]
    take_down: Callable[[str], Awaitable[None]]  # by node name (X-Confedge-Node)


@contextlib.asynccontextmanager
async def in_process(state: Path, base: int) -> AsyncIterator[Running]:
    from confedge.demo import Demo

    demo = Demo(state, port_base=base)
    try:
        await demo.start()
    except OSError as exc:
        await demo.close()
        pytest.fail(f"the demo's ports (--port-base {base}) are busy: {exc}")

    async def turn_stats() -> dict[str, int]:
        stats: dict[str, int] = demo.runtime.turn.stats()
        return stats

    async def kill(name: str) -> None:
        (node,) = [n for n in demo.nodes if n.node_name == name]
        await node.close()

    try:
        yield Running("in-process", demo.info(), turn_stats, kill)
    finally:
        await demo.close()


@contextlib.asynccontextmanager
async def as_command(state: Path, log: Path, base: int) -> AsyncIterator[Running]:
    """`python -m confedge demo --json --port-base N`; its log (access log included) goes to a
    file."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "confedge",
            "demo",
            "--json",
            "--state-dir",
            str(state),
            "--port-base",
            str(base),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.stdout is not None
    try:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
        except TimeoutError:
            line = b""
        if not line:
            pytest.fail(f"`confedge demo --json` printed nothing; log:\n{log.read_text()[-3000:]}")
        info = json.loads(line)

        async def turn_stats() -> dict[str, int]:
            stats: dict[str, int] = (await _status(info))["turn"]
            return stats

        async def maintenance(name: str) -> None:
            # docs/DEMO.md's failover step: the node's local maintenance switch, then the
            # proxy's health checks take it out of rotation (the status page shows it).
            url = info["nodes"][int(name.removeprefix("node")) - 1]
            code, _, body = await asyncio.to_thread(_http, f"{url}/admin/maintenance?on=1", "POST")
            assert code == 200, body

            async def out_of_rotation() -> bool:
                nodes = (await _status(info))["proxy"]["nodes"]
                return any(n["node"] == url and n["state"] != "up" for n in nodes)

            await _until(f"the proxy to take {name} out of rotation", out_of_rotation, 10)

        yield Running("subprocess", info, turn_stats, maintenance)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _check_call(result: dict[str, Any], who: str, relays: tuple[int, int]) -> None:
    """The browser's own view: connected, decoding echoed video, media via confedge's relay."""
    diag = json.dumps(result, indent=1)[-4000:]
    assert result["ok"], diag
    assert result["state"] == "connected", diag
    assert result["framesDecoded"] > 0, diag
    assert result["remoteVideo"]["width"] > 0, diag
    remote = result["pair"]["remote"]
    assert result["pair"]["state"] == "succeeded", diag
    assert remote["candidateType"] == "relay", diag
    assert remote["address"] == "127.0.0.1", diag
    assert relays[0] <= remote["port"] <= relays[1], diag
    assert any(p.startswith(who) and p.endswith("in call") for p in result["participants"]), diag


@pytest.mark.parametrize("variant", ["in-process", "subprocess"])
async def test_demo_call(variant: str, tmp_path: Path) -> None:
    node_bin = require_browser()
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / ("demo_call.png" if variant == "in-process" else "demo_call_subprocess.png")
    shot.unlink(missing_ok=True)
    port_base = demo_port_base()
    ports = DemoPorts.from_base(port_base)
    started = (
        in_process(tmp_path / "state", port_base)
        if variant == "in-process"
        else as_command(tmp_path / "state", tmp_path / "demo.log", port_base)
    )
    async with started as demo:
        origin = f"https://127.0.0.1:{ports.https}"
        assert demo.info["proxy"]["https"].rstrip("/") == origin
        assert {"alias": "meet", "pin": HOST_PIN, "guest_pin": None} in demo.info["conferences"]

        async def proxy_ready() -> bool:
            code, _, _ = await asyncio.to_thread(_http, origin + "/api/client/v2/status")
            return code == 200

        await _until("the proxy to answer", proxy_ready, 15)
        browser = {
            "url": origin + "/webapp/",
            "alias": "meet",
            "chromium": CHROMIUM,
            "ignoreHttpsErrors": True,
            "args": ["--ignore-certificate-errors"],
            "timeoutMs": 30000,
        }

        # 1. Wrong PIN, then the host PIN: the call connects through the relay.
        first = await run_driver(
            node_bin,
            {
                **browser,
                "name": "Alice",
                "pin": HOST_PIN,
                "wrongPin": "0000",
                "screenshot": str(shot),
            },
            timeout=50,
        )
        _check_call(first, "Alice (you) [chair]", ports.relays)
        # The web app and its event stream came over HTTP/2 (the demo's proxy.http2 default).
        assert_loaded_over(first, origin, "h2")
        assert first["wrongPinError"] == "Invalid PIN" and first["wrongPinVisible"], first
        assert first["errorHiddenAfterJoin"] is True
        served = first["tokenNodes"][-1]
        assert served["status"] == 200 and served["node"] in ("node1", "node2", "node3"), first
        assert first["role"] == f"as HOST in meet on {served['node']}", first["role"]
        assert shot.stat().st_size > 10_000
        # The media crossed confedge's TURN server, both ways (browser -> node and back).
        stats = await demo.turn_stats()
        assert stats["bytes_to_peer"] > 10_000 and stats["bytes_to_client"] > 10_000, stats

        # 2. Take that node down; a guest (no PIN) joins on another node, unbothered.
        await demo.take_down(served["node"])
        second = await run_driver(
            node_bin,
            {
                **browser,
                "name": "Bob",
                "pin": "",
                "minFrames": 5,
                "guessPin": "0000",
                "guessMax": MAXRETRY + 3,
            },
            timeout=50,
        )
        _check_call(second, "Bob (you) [guest]", ports.relays)
        # The guest's join: 403 "PIN required" from the node, then pin "none" -> 200.
        joins = second["tokenNodes"][:2]
        assert [j["status"] for j in joins] == [403, 200], second["tokenNodes"]
        moved = joins[1]["node"]
        assert moved not in (None, served["node"]), (served, joins)
        assert second["role"] == f"as GUEST in meet on {moved}", second["role"]

        # 3. The guard: the first wrong PIN and these make maxretry; the next is refused by
        # the edge itself. Failover and the guest's PIN-less probe counted for nothing.
        guesses = second["guesses"]
        assert guesses[:-1] == ["Invalid PIN"] * (MAXRETRY - 1), guesses
        assert guesses[-1].startswith("Too many attempts: this address is blocked for "), guesses
        assert second["tokenNodes"][-1] == {"status": 429, "node": None}
        bans = (await _status(demo.info))["guard"]["bans"]
        assert [b["source"] for b in bans] == ["127.0.0.1"], bans
