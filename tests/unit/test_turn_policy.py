"""Peer policy table (SPEC §3): every refusal rule and every IPv6 bypass form."""

from __future__ import annotations

import ipaddress

import pytest

from confedge.turn.policy import ClientPolicy, PeerPolicy, embedded_ipv4, normalise

SERVER = ["198.51.100.7", "203.0.113.5"]


def restricted(**kw: list[str]) -> PeerPolicy:
    return PeerPolicy(permissive=False, server_addresses=SERVER, **kw)


def permissive(**kw: list[str]) -> PeerPolicy:
    return PeerPolicy(permissive=True, server_addresses=SERVER, **kw)


# (peer as the client writes it, rule expected in restricted mode)
REFUSED_ALWAYS_BUILTIN = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped (CVE-2026-27624)
    ("::127.0.0.1", "loopback"),  # IPv4-compatible
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 well-known prefix (RFC 6052)
    ("64:ff9b::127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a9fe:a9fe", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("::ffff:224.0.0.251", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.51.100.7", "server-address"),
    ("::ffff:203.0.113.5", "server-address"),
    ("64:ff9b::cb00:7105", "server-address"),
]

UNSPECIFIED = ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "64:ff9b::", "::0.0.0.2"]

PRIVATE = [
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "198.18.0.1",
    "192.0.0.8",
    "fd00::1",
    "fc00::1",
    "fec0::1",
    "::ffff:10.0.0.1",
    "::10.0.0.1",
    "64:ff9b::a00:1",
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize(("peer", "rule"), REFUSED_ALWAYS_BUILTIN)
@pytest.mark.parametrize("make", [restricted, permissive])
def test_builtin_refusals(make: type[PeerPolicy], peer: str, rule: str) -> None:
    v = make().check(peer)
    assert not v.allowed
    assert v.rule == rule


@pytest.mark.parametrize("peer", UNSPECIFIED)
def test_unspecified_refused_even_when_allowed(peer: str) -> None:
    pol = restricted(allowed=["0.0.0.0/0", "::/0"])
    v = pol.check(peer)
    assert not v.allowed
    assert v.rule == "unspecified"


@pytest.mark.parametrize("peer", PRIVATE)
def test_private_ranges(peer: str) -> None:
    assert restricted().check(peer).allowed  # restricted: nodes relay to anything public/private
    v = permissive().check(peer)
    assert not v.allowed and v.rule == "private"
    assert (
        permissive(
            allowed=[
                "10.0.0.0/8",
                "fd00::/8",
                "fc00::/7",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "198.18.0.0/15",
                "192.0.0.0/24",
                "fec0::/10",
            ]
        )
        .check(peer)
        .allowed
    )


@pytest.mark.parametrize("peer", PUBLIC)
@pytest.mark.parametrize("make", [restricted, permissive])
def test_public_allowed(make: type[PeerPolicy], peer: str) -> None:
    assert make().check(peer).allowed


@pytest.mark.parametrize(
    "peer", ["127.0.0.1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1"]
)
def test_allowed_peers_admit_loopback_in_every_form(peer: str) -> None:
    pol = restricted(allowed=["127.0.0.1"])
    v = pol.check(peer)
    assert v.allowed and v.rule.startswith("allowed_peers")
    # ...but only that address, not the rest of 127/8 and not ::1.
    assert not pol.check("127.0.0.2").allowed
    assert not pol.check("::1").allowed


def test_allowed_peers_written_in_mapped_form() -> None:
    pol = restricted(allowed=["::ffff:127.0.0.0/104"])
    assert pol.check("127.1.2.3").allowed


def test_denied_wins_over_allowed() -> None:
    pol = restricted(allowed=["127.0.0.0/8", "8.8.0.0/16"], denied=["127.0.0.1", "8.8.8.8/32"])
    v = pol.check("::ffff:127.0.0.1")
    assert not v.allowed and v.rule.startswith("denied_peers")
    assert not pol.check("64:ff9b::808:808").allowed
    assert pol.check("127.0.0.2").allowed
    assert pol.check("8.8.4.4").allowed


def test_denied_public() -> None:
    pol = permissive(denied=["2001:db8::/32", "8.8.8.0/24"])
    assert not pol.check("2001:db8::1").allowed
    assert not pol.check("8.8.8.8").allowed
    assert pol.check("9.9.9.9").allowed


def test_nat64_local_use_prefix() -> None:
    # RFC 8215 64:ff9b:1::/48: the embedded position depends on the site's prefix length.
    addr = ipaddress.IPv6Address("64:ff9b:1:7f00:0:100::")  # /48 layout: 7f00, u-octet, 0001
    assert ipaddress.IPv4Address("127.0.0.1") in embedded_ipv4(addr)
    v = restricted().check(str(addr))
    assert not v.allowed and v.rule == "nat64-local/loopback"
    v = restricted().check("64:ff9b:1::7f00:1")  # /96 layout
    assert not v.allowed and v.rule.startswith("nat64-local/")
    # Every reading (/48, /56, /64, /96) of this one is 8.8.8.8: refused by default, allowed
    # when the operator lists the prefix.
    public = "64:ff9b:1:808:8:808:808:808"
    assert set(embedded_ipv4(ipaddress.IPv6Address(public))) == {ipaddress.IPv4Address("8.8.8.8")}
    assert not restricted().check(public).allowed
    assert restricted(allowed=["64:ff9b:1::/48"]).check(public).allowed
    # A /96-style 8.8.8.8 reads as 0.0.0.0 under the /48 layout: refused (CVE-2020-26262 shape).
    assert not restricted(allowed=["64:ff9b:1::/48"]).check("64:ff9b:1::808:808").allowed
    # Listing the prefix does not let a loopback form through.
    assert not restricted(allowed=["64:ff9b:1::/48"]).check("64:ff9b:1::7f00:1").allowed


def test_normalise_keeps_special_v6() -> None:
    assert str(normalise(ipaddress.ip_address("::1"))) == "::1"
    assert str(normalise(ipaddress.ip_address("::"))) == "::"
    assert str(normalise(ipaddress.ip_address("::ffff:1.2.3.4"))) == "1.2.3.4"
    assert str(normalise(ipaddress.ip_address("::1.2.3.4"))) == "1.2.3.4"
    assert str(normalise(ipaddress.ip_address("64:ff9b::1.2.3.4"))) == "1.2.3.4"


def test_malformed_and_cache() -> None:
    pol = restricted()
    assert not pol.check("not-an-ip").allowed
    assert pol.check("8.8.8.8") is pol.check("8.8.8.8")  # memoised


def test_client_policy() -> None:
    pol = ClientPolicy(restricted=True, media_nodes=["10.0.0.0/24", "2001:db8::11"])
    assert pol.may_allocate("10.0.0.11")
    assert pol.may_allocate("::ffff:10.0.0.12")
    assert pol.may_allocate("2001:db8::11")
    assert not pol.may_allocate("10.0.1.1")
    assert not pol.may_allocate("127.0.0.1")
    assert not pol.may_allocate("garbage")
    assert not ClientPolicy(restricted=True, media_nodes=[]).may_allocate("10.0.0.11")
    assert ClientPolicy(restricted=False, media_nodes=[]).may_allocate("192.0.2.1")


def test_relay_address_is_a_peer_on_relay_ports_only() -> None:
    pol = PeerPolicy(
        permissive=True,
        server_addresses=["10.0.0.5", "203.0.113.5"],  # single NIC: the relay is also listener
        relay_addresses=["203.0.113.5"],
        relay_ports=(49152, 65535),
    )
    for form in ["203.0.113.5", "::ffff:203.0.113.5", "64:ff9b::cb00:7105"]:
        v = pol.check(form)
        assert v.allowed and v.rule == "relay-address" and v.relay_ports_only
        assert pol.port_allowed(v, 49152) and pol.port_allowed(v, 65535)
        assert not pol.port_allowed(v, 3478) and not pol.port_allowed(v, 443)
    v = pol.check("10.0.0.5")
    assert not v.allowed and v.rule == "server-address"
    v = pol.check("8.8.8.8")
    assert pol.port_allowed(v, 22)  # ordinary peers: any port
    # Denied still wins.
    pol = PeerPolicy(permissive=False, denied=["203.0.113.0/24"], relay_addresses=["203.0.113.5"])
    assert not pol.check("203.0.113.5").allowed
