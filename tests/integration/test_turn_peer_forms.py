"""Issue 11, TURN peer filter: a real client over UDP sockets asks a running TurnService for
permissions to IPv6 forms that embed refused IPv4 addresses, and to this host's own addresses.

The configuration is the demo's and the tests' (``allowed_peers = ["127.0.0.1"]``), with an
IPv6 relay on ::1 so that IPv6 peers get as far as the peer policy.  Every transition form
(6to4, Teredo, SIIT) of 127.0.0.1, of a private 10.x and of link-local 169.254.169.254 must
get 403 -- listing 127.0.0.1 admits 127.0.0.1, not a 6to4 relay to it -- and so must the
addresses of this machine's own interfaces (read here with iproute2, independently of the
server's psutil), while ordinary peers and the explicitly allowed 127.0.0.1 still get 200.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest

from confedge.turn.service import TurnService
from confedge.turn.testing import UdpTurnClient, response_code, turn_config


def _6to4(v4: str) -> str:
    # RFC 3056 §2: 2002:V4ADDR::/48
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1))


def _teredo(v4: str) -> str:
    # RFC 4380 §4: server 65.54.227.120 (bits 32-63), client IPv4 inverted in bits 96-127.
    server = int(ipaddress.IPv4Address("65.54.227.120"))
    client = int(ipaddress.IPv4Address(v4)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (server << 64) | (0x8000 << 48) | client))


def _siit(v4: str) -> str:
    # RFC 2765 §2.1: ::ffff:0:a.b.c.d
    return str(ipaddress.IPv6Address((0xFFFF << 48) | int(ipaddress.IPv4Address(v4))))


INNER = ["127.0.0.1", "10.1.2.3", "169.254.169.254"]
FORMS = [f(v4) for v4 in INNER for f in (_6to4, _teredo, _siit)]


def _own_addresses() -> list[str]:
    """This host's non-loopback, non-link-local interface addresses (iproute2's view)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    addrs = []
    for link in json.loads(out.stdout):
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if not (ip.is_loopback or ip.is_link_local):
                addrs.append(str(ip))
    return addrs


@pytest.fixture
async def service() -> AsyncIterator[TurnService]:
    svc = TurnService(turn_config(relay_address_v6="::1"))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


async def _client(svc: TurnService, family: int) -> UdpTurnClient:
    info = svc.info()
    cli = UdpTurnClient((svc.host, svc.port), info["username"], info["password"], info["realm"])
    resp = await cli.allocate(family)
    assert resp is not None and response_code(resp) == 200, resp
    return cli


async def test_transition_forms_and_own_addresses_get_403(service: TurnService) -> None:
    v4, v6 = await _client(service, 4), await _client(service, 6)
    try:
        refused = {peer: await v6.create_permission(peer) for peer in FORMS}
        assert refused == dict.fromkeys(FORMS, 403)
        own = _own_addresses()
        assert own, "this host has no non-loopback address to test with"
        for ip in own:
            cli = v6 if ":" in ip else v4
            assert await cli.create_permission(ip) == 403, f"own address {ip} was granted"
        # Controls: the same client gets ordinary peers, and the listed 127.0.0.1 (a host
        # address too) stays allowed -- the demo still relays.
        assert await v4.create_permission("127.0.0.1") == 200
        assert await v4.create_permission("8.8.8.8") == 200
        assert await v6.create_permission("2606:4700:4700::1111") == 200
    finally:
        v4.close()
        v6.close()


UCLIENT = shutil.which("turnutils_uclient")


@pytest.mark.coturn
@pytest.mark.skipif(UCLIENT is None, reason="coturn's turnutils_uclient is not installed")
async def test_uclient_own_address_refused(service: TurnService) -> None:
    """coturn's client, the way an operator would try it: a relay to this host's eth0 address."""
    import asyncio

    own = [ip for ip in _own_addresses() if ":" not in ip]
    if not own:
        pytest.skip("this host has no non-loopback IPv4 address")
    assert UCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        UCLIENT,
        "-c",
        "-n",
        "1",
        "-p",
        str(service.port),
        "-u",
        "turnuser",
        "-w",
        "turnpass",
        "-e",
        own[0],
        "-r",
        "9",
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert "error 403" in text, text[-1500:]
    assert service.stats()["bytes_to_peer"] == 0
