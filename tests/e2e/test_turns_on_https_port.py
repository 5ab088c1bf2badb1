"""TURN over TLS on the HTTPS port (turn.tls_on_https) with the clients people really use.

1. What a `turns:` client puts in its ClientHello, measured: Chromium's sends no ALPN at all, so
   the HTTPS listener cannot route it by ALPN; coturn's uclient offers "http/1.1", "stun.turn"
   and "stun.nat-discovery". (The design in docs/TURN.md follows from this; if a Chromium
   update starts to offer stun.turn, this test says so.)
2. Chromium joins a conference through the demo's composition (on free ports): the simulated
   node's web app loads over HTTPS from the proxy's port, and the browser's only ICE server is
   ``turns:127.0.0.1:<that port>?transport=tcp`` with relay-only ICE, so the call's media can
   only cross TURN over TLS on the shared port. The selected pair's local candidate must be a
   relay candidate reached over TLS through that URL, and the node's echoed video must decode.
3. coturn's turnutils_uclient -t -S (TLS) allocates and relays through the HTTPS port, with the
   proxy in process and in two worker processes, while the web app is served on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from chromium_driver import CHROMIUM, require_browser, run_driver
from msgspec.structs import replace

import confedge.demo as demo_mod
from confedge.demo import Demo, _print_banner, turns_url
from confedge.nodesim import Conference, NodeSim
from confedge.runtime import Runtime
from confedge.turn.testing import shared_port_config
from ports import spare_port, spare_ports, udp_echo_ready

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
RELAY_LO, RELAY_HI = 39300, 39399  # this area's relay ports (e2e)
UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")
_TOTALS = re.compile(r"tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)")

sys.path.insert(0, str(TESTS))
from clienthello import ClientHelloError, NeedMore, parse_client_hello  # noqa: E402


def _get(url: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return resp.status, resp.read()


# -- 1. the ClientHello of turns: clients --------------------------------------------------------


@contextlib.asynccontextmanager
async def hello_catcher() -> AsyncIterator[tuple[int, list[Any]]]:
    """A TCP listener that reads each connection's ClientHello and hangs up."""
    seen: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while True:
                try:
                    seen.append(parse_client_hello(buf))
                    return
                except NeedMore:
                    data = await asyncio.wait_for(reader.read(4096), 5)
                    if not data:
                        return
                    buf += data
                except ClientHelloError as exc:
                    seen.append(exc)
                    return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()


@pytest.mark.chromium
async def test_chromium_turns_client_hello_has_no_alpn() -> None:
    node_bin = require_browser()
    async with hello_catcher() as (port, seen):
        for host in ("127.0.0.1", "localhost"):
            cfg = {
                "url": f"turns:{host}:{port}?transport=tcp",
                "username": "u",
                "credential": "p",
                "timeoutMs": 1500,
                "chromium": CHROMIUM,
            }
            await run_driver(node_bin, cfg, 30, driver=HERE / "turn_chromium_driver.mjs")
    hellos = [h for h in seen if not isinstance(h, Exception)]
    assert hellos, f"Chromium sent no ClientHello: {seen}"
    assert all(h.alpn == () for h in hellos), [h.alpn for h in hellos]  # no ALPN extension
    assert all(16 not in h.extensions for h in hellos)
    assert {h.sni for h in hellos} == {None, "localhost"}  # SNI only for a name (RFC 6066 §3)


@pytest.mark.coturn
@pytest.mark.skipif(UCLIENT is None, reason="coturn's turnutils_uclient is not installed")
async def test_uclient_tls_client_hello_offers_stun_turn() -> None:
    assert UCLIENT is not None
    async with hello_catcher() as (port, seen):
        proc = await asyncio.create_subprocess_exec(
            UCLIENT, "-c", "-t", "-S", "-n", "1", "-p", str(port), "-u", "u", "-w", "p",
            "-e", "127.0.0.1", "127.0.0.1",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert seen and seen[0].alpn == ("http/1.1", "stun.turn", "stun.nat-discovery"), seen[:1]


# -- 2. Chromium: a call through turns: on the demo's HTTPS port -----------------------------------


@contextlib.asynccontextmanager
async def demo_on_free_ports(state: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Demo]:
    """`confedge demo`'s composition (demo.toml: tls_on_https on), moved to free ports."""
    monkeypatch.setattr(demo_mod, "NODE_PORTS", tuple(spare_ports(3)))
    demo = Demo(state)
    c = demo.cfg
    assert c.turn.tls_on_https, "the demo shows TURN over TLS on the HTTPS port"
    demo.cfg = replace(
        c,
        proxy=replace(c.proxy, https_port=0, http_port=0),
        turn=replace(c.turn, port=0, tls_port=0, relay_ports=f"{RELAY_LO}-{RELAY_HI}"),
        management=replace(c.management, port=0),
    )
    demo.runtime = Runtime(demo.cfg)
    try:
        await demo.start()
        yield demo
    finally:
        await demo.close()


@pytest.mark.chromium
@pytest.mark.timeout(90)
async def test_chromium_call_over_turns_on_the_https_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("aiortc")
    node_bin = require_browser()
    async with demo_on_free_ports(tmp_path / "state", monkeypatch) as demo:
        info = demo.info()
        port = demo.runtime.proxy.https_port
        base = f"https://127.0.0.1:{port}"
        turn = info["turn"]
        # The demo names the turns: URL on the HTTPS port, in its JSON and its banner.
        assert turn["turns"] == turns_url("127.0.0.1", port)
        assert turn["turns"] == f"turns:127.0.0.1:{port}?transport=tcp"
        json.dumps(info)
        _print_banner(info)
        assert f"  TURN/TLS:    turns:127.0.0.1:{port}?transport=tcp" in capfd.readouterr().out

        for _ in range(50):  # the proxy's first health checks
            try:
                if (await asyncio.to_thread(_get, base + "/api/client/v2/status"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
        before = demo.runtime.turn.stats()
        result = await run_driver(
            node_bin,
            {
                "url": base + "/webapp/",
                "alias": "meet",
                "name": "Alice",
                "pin": "1234",
                "chromium": CHROMIUM,
                "ignoreHttpsErrors": True,
                "args": ["--ignore-certificate-errors"],
                "timeoutMs": 40000,
                "minFrames": 10,
                "rtcConfig": {
                    "iceServers": [
                        {
                            "urls": turn["turns"],
                            "username": turn["username"],
                            "credential": turn["password"],
                        }
                    ],
                    "iceTransportPolicy": "relay",
                },
            },
            timeout=70,
        )
        diag = json.dumps(result, indent=1)[-4000:]
        assert result["ok"], diag
        assert result["state"] == "connected", diag
        assert result["framesDecoded"] >= 10 and result["remoteVideo"]["width"] > 0, diag
        pair = result["pair"]
        assert pair["state"] == "succeeded", diag
        local = pair["local"]
        # The browser's own candidate is a relay it allocated over TLS on the HTTPS port.
        assert local["candidateType"] == "relay", diag
        assert local["relayProtocol"] == "tls", diag
        assert local["url"] == turn["turns"], diag
        assert local["address"] == "127.0.0.1" and RELAY_LO <= local["port"] <= RELAY_HI, diag
        after = demo.runtime.turn.stats()
        sent = after["bytes_to_peer"] - before["bytes_to_peer"]
        back = after["bytes_to_client"] - before["bytes_to_client"]
        assert sent > 10_000 and back > 10_000, (before, after)


# -- 3. coturn's uclient over TLS on the HTTPS port -------------------------------------------------


@contextlib.asynccontextmanager
async def shared_port_runtime(tmp_path: Path, workers: int) -> AsyncIterator[Runtime]:
    node = NodeSim(conferences=[Conference("meet", None, None)], node_name="node1")
    await node.start("127.0.0.1", 0)
    relays = f"{RELAY_LO}-{RELAY_HI}"
    cfg = shared_port_config(str(tmp_path), [node.url], workers=workers, relay_ports=relays)
    rt = Runtime(cfg)
    try:
        await rt.start()
        yield rt
    finally:
        await rt.close()
        await node.close()


async def _uclient(port: int, peer: int, flags: list[str]) -> str:
    assert UCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        UCLIENT, "-c", "-t", "-S", "-n", "3", "-m", "1", "-p", str(port),
        "-u", "turnuser", "-w", "turnpass", "-e", "127.0.0.1", "-r", str(peer), *flags,
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 25)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out.decode(errors="replace")


@pytest.mark.coturn
@pytest.mark.skipif(not (UCLIENT and PEER), reason="coturn's turnutils tools are not installed")
@pytest.mark.parametrize("workers", [1, 2])
async def test_uclient_relays_through_the_https_port(tmp_path: Path, workers: int) -> None:
    assert PEER is not None
    peer_port = spare_port()
    peer = await asyncio.create_subprocess_exec(
        PEER, "-p", str(peer_port), "-L", "127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.to_thread(
            udp_echo_ready, "127.0.0.1", peer_port, lambda: peer.returncode is None
        )

        async def one(flags: list[str], sub: str) -> tuple[str, dict[str, int], int]:
            # A fresh server per case: uclient never releases one allocation and reuses ports.
            async with shared_port_runtime(tmp_path / sub, workers) as rt:
                port = rt.proxy.https_port
                out, (status, page) = await asyncio.gather(
                    _uclient(port, peer_port, flags),
                    asyncio.to_thread(_get, f"https://127.0.0.1:{port}/webapp/"),
                )
                assert b"<html" in page.lower()
                return out, rt.turn.stats(), status

        results = await asyncio.gather(one([], "channels"), one(["-s"], "send"))
    finally:
        peer.terminate()
        await peer.wait()
    for out, stats, status in results:
        totals = _TOTALS.findall(out)
        assert totals and totals[-1] == ("300", "300"), out[-2000:]
        assert stats["bytes_to_peer"] >= 300 and stats["bytes_to_client"] >= 300, stats
        assert status == 200
