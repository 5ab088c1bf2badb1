"""coturn's own test client (turnutils_uclient) and echo peer (turnutils_peer) against confedge.

uclient allocates two relays, binds channels (or, with -s, creates permissions and uses Send
indications), sends -n messages through one relay to the peer, which echoes them back via the
other relay, and prints how many bytes went out and came back.  Every case must receive all it
sent.  The Debian uclient (4.6.1) never releases one of its allocations and reuses local ports,
so every case gets a fresh confedge server (ephemeral TURN port); the cases of a test run
concurrently to keep the suite fast (uclient paces itself at about one message per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from confedge.turn.service import TurnService
from confedge.turn.testing import turn_config
from ports import free_port, has_ipv6_loopback, udp_echo_ready

UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")
STUNCLIENT = shutil.which("turnutils_stunclient")

pytestmark = [
    pytest.mark.coturn,
    pytest.mark.skipif(
        not (UCLIENT and PEER and STUNCLIENT),
        reason="coturn's turnutils_* tools are not installed (apt-get install coturn)",
    ),
]

_TOTALS = re.compile(r"tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)")


def _free_udp_port() -> int:
    """A free UDP port within this area's listener range (20000-20999)."""
    for _ in range(200):
        port = random.randint(20500, 20999)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port in 20500-20999")


@contextlib.asynccontextmanager
async def _turnutils_peer(host: str) -> AsyncIterator[int]:
    """turnutils_peer echoing on <host>:<port>."""
    assert PEER is not None
    port = _free_udp_port()
    proc = await asyncio.create_subprocess_exec(
        PEER,
        "-p",
        str(port),
        "-L",
        host,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(udp_echo_ready, host, port, lambda: proc.returncode is None)
        yield port
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def echo_peer() -> AsyncIterator[int]:
    async with _turnutils_peer("127.0.0.1") as port:
        yield port


async def _uclient(port: int, *args: str, timeout: float = 25) -> str:
    assert UCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        UCLIENT,
        "-c",
        "-p",
        str(port),
        *args,
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def _case(cfg_kwargs: dict[str, Any], args: list[str]) -> tuple[str, dict[str, int]]:
    svc = TurnService(turn_config(**cfg_kwargs))
    await svc.start()
    try:
        out = await _uclient(svc.port, *args)
        stats = svc.stats()
    finally:
        await svc.close()
    return out, stats


CASES = [
    # (id, mode, uclient flags)
    ("udp-channel-longterm", "restricted", ["-u", "turnuser", "-w", "turnpass"]),
    ("udp-send-longterm", "restricted", ["-s", "-u", "turnuser", "-w", "turnpass"]),
    ("tcp-channel-longterm", "restricted", ["-t", "-u", "turnuser", "-w", "turnpass"]),
    ("tcp-send-longterm", "restricted", ["-t", "-s", "-u", "turnuser", "-w", "turnpass"]),
    ("udp-channel-rest", "permissive", ["-u", "bob", "-W", "s3cret-current"]),
    ("udp-send-rest", "permissive", ["-s", "-u", "bob", "-W", "s3cret-current"]),
    ("tcp-channel-rest-rotated", "permissive", ["-t", "-u", "bob", "-W", "s3cret-previous"]),
    ("tcp-send-rest", "permissive", ["-t", "-s", "-u", "bob", "-W", "s3cret-current"]),
]


def _every_message_back(name: str, out: str, n: int) -> int:
    """uclient's last totals line: it sent n * 100 messages and received every one; the count."""
    totals = _TOTALS.findall(out)
    assert totals, f"{name}: uclient printed no totals:\n{out[-2000:]}"
    sent, received = map(int, totals[-1])
    assert sent == n * 100, f"{name}: sent {sent}\n{out[-2000:]}"
    assert received == sent, f"{name}: received {received} of {sent}\n{out[-2000:]}"
    return sent


async def test_uclient_relays_every_message(echo_peer: int) -> None:
    n = 3
    jobs = [
        _case({"mode": mode}, ["-n", str(n), "-e", "127.0.0.1", "-r", str(echo_peer), *flags])
        for _, mode, flags in CASES
    ]
    results = await asyncio.gather(*jobs)
    for (name, _, _), (out, stats) in zip(CASES, results, strict=True):
        sent = _every_message_back(name, out, n)
        # Both directions went through confedge (the echo comes back via the second relay).
        assert stats["bytes_to_peer"] >= sent, name
        assert stats["bytes_to_client"] >= sent, name


async def test_uclient_relays_every_message_multiplexed(echo_peer: int) -> None:
    """turn.relay_multiplex = 1 with a relay range of 4 ports: two even ones go to the shared
    sockets (the native plane's for UDP clients, the Python plane's for TCP clients), so
    uclient's two EVEN-PORT allocations fit only on a shared socket; every message comes back
    (docs/TURN.md "Shared relay sockets")."""
    n = 3
    names = (
        "udp-channel-longterm",
        "udp-send-longterm",
        "tcp-channel-longterm",
        "udp-channel-rest",
    )
    cases = [c for c in CASES if c[0] in names]
    jobs = []
    for _, mode, flags in cases:
        port = 4 * (free_port(23000, 23896, shuffle=True, udp=True) // 4)
        cfg = {
            "mode": mode,
            "relay_multiplex": 1,
            "relay_ports": f"{port}-{port + 3}",
            "dataplane_threads": 1,
        }
        args = ["-n", str(n), "-e", "127.0.0.1", "-r", str(echo_peer), *flags]
        jobs.append(_case(cfg, args))
    results = await asyncio.gather(*jobs)
    for (name, _, _), (out, stats) in zip(cases, results, strict=True):
        sent = _every_message_back(name, out, n)
        assert stats["bytes_to_client"] >= sent, name


@pytest.mark.skipif(not has_ipv6_loopback(), reason="host has no IPv6 loopback (::1)")
async def test_uclient_ipv6_relay() -> None:
    """RFC 6156: uclient -x asks for an IPv6 relay; peer on ::1 (listed in allowed_peers)."""
    cfg = {"relay_address_v6": "::1", "allowed_peers": ["::1"]}
    async with _turnutils_peer("::1") as port:
        flags = ["-x", "-n", "3", "-u", "turnuser", "-w", "turnpass", "-e", "::1", "-r", str(port)]
        results = await asyncio.gather(
            _case(cfg, flags), _case(cfg, [*flags, "-s"]), _case(cfg, [*flags, "-t"])
        )
    for out, stats in results:
        _every_message_back("IPv6", out, 3)
        assert stats["bytes_to_peer"] >= 300


class _Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, Any]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.packets.append((data, addr))


@contextlib.asynccontextmanager
async def _recording_peer(port: int) -> AsyncIterator[_Recorder]:
    """A dual-stack socket on [::]:port: sees anything sent to any loopback form of the port."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    transport, proto = await loop.create_datagram_endpoint(_Recorder, sock=sock)
    try:
        yield proto
    finally:
        transport.close()


REFUSED = ["127.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "169.254.169.254"]


async def test_uclient_refused_peers_get_403_and_nothing_arrives() -> None:
    port = _free_udp_port()
    # No allowed_peers: loopback is refused; an IPv6 relay on ::1 lets uclient's IPv6 peers
    # reach CreatePermission/ChannelBind (instead of 440 at Allocate).
    cfg = {"allowed_peers": [], "relay_address_v6": "::1"}
    async with _recording_peer(port) as rec:
        jobs = [
            _case(
                cfg,
                ["-n", "2", *send, "-u", "turnuser", "-w", "turnpass", "-e", peer, "-r", str(port)],
            )
            for peer in REFUSED
            for send in ([], ["-s"])
        ]
        results = await asyncio.gather(*jobs)
        await asyncio.sleep(0.2)
        assert rec.packets == []
    for i, (out, stats) in enumerate(results):
        peer = REFUSED[i // 2]
        assert "error 403" in out, f"{peer}: no 403 in uclient output:\n{out[-1500:]}"
        assert stats["bytes_to_peer"] == 0, peer


async def test_uclient_restricted_mode_outside_media_nodes() -> None:
    """Client at 127.0.0.2 with media_nodes = [127.0.0.1]: Binding yes, Allocate 403."""
    assert STUNCLIENT is not None
    svc = TurnService(turn_config(media_nodes=["127.0.0.1"]))
    await svc.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            STUNCLIENT,
            "-L",
            "127.0.0.2",
            "-p",
            str(svc.port),
            "127.0.0.1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert "reflexive addr: 127.0.0.2:" in out.decode(), out.decode()
        for flags in ([], ["-t"]):
            text = await _uclient(
                svc.port,
                "-n",
                "2",
                *flags,
                "-L",
                "127.0.0.2",
                "-u",
                "turnuser",
                "-w",
                "turnpass",
                "-e",
                "127.0.0.1",
                "-r",
                "20999",
            )
            assert "error 403" in text, text[-1500:]
            assert "Received relay addr" not in text
        assert svc.stats()["allocations"] == 0
    finally:
        await svc.close()


async def test_uclient_over_tls(echo_peer: int, tmp_path: Any) -> None:
    """uclient -t -S: TURN over TLS on turn.tls_port, channels and Send indications."""

    # Both ports chosen before either server binds: each picked inside the two concurrent
    # starts could be the same free port (one start then failed with "already in use").
    first = free_port(20000, 20500, shuffle=True)
    second = first
    while second == first:
        second = free_port(20000, 20500, shuffle=True)

    async def one(port: int, flags: list[str]) -> str:
        svc = TurnService(turn_config(tls_port=port, state_dir=str(tmp_path)))
        await svc.start()
        try:
            return await _uclient(
                svc.tls_port,
                "-t",
                "-S",
                "-n",
                "3",
                "-u",
                "turnuser",
                "-w",
                "turnpass",
                "-e",
                "127.0.0.1",
                "-r",
                str(echo_peer),
                *flags,
            )
        finally:
            await svc.close()

    for out in await asyncio.gather(one(first, []), one(second, ["-s"])):
        _every_message_back("uclient", out, 3)
