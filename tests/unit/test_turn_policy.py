"""Peer policy table (SPEC §3): every refusal rule and every IPv6 bypass form."""

from __future__ import annotations

import ipaddress

import pytest

from confedge.turn.policy import (
    ClientPolicy,
    PeerPolicy,
    TransitionForm,
    embedded_ipv4,
    normalise,
    transition_form,
)

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
    ("::127.0.0.1", "ipv4-compatible/loopback"),  # RFC 4291 §2.5.5.1
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
    assert v.rule.endswith("unspecified")  # "ipv4-compatible/unspecified" for ::0.0.0.2


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


@pytest.mark.parametrize("peer", ["127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"])
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


# -- issue 11: every IPv6 form that embeds an IPv4 address --------------------------------------


def _teredo(client: str, server: str = "65.54.227.120") -> str:
    """RFC 4380 §4: 2001:0:<server>:<flags>:<~port>:<~client>."""
    c = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    s = int(ipaddress.IPv4Address(server))
    flags = 0x8000 << 48  # cone bit
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (s << 64) | flags | c))


def _6to4(v4: str) -> str:
    """RFC 3056 §2: 2002:V4ADDR::/48 (here with subnet 1 and host ::1)."""
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1))


def _siit(v4: str) -> str:
    """RFC 2765 §2.1: ::ffff:0:a.b.c.d."""
    return str(ipaddress.IPv6Address((0xFFFF << 48) | int(ipaddress.IPv4Address(v4))))


FORMS = {"6to4": _6to4, "teredo": _teredo, "siit": _siit}
INNER = [("127.0.0.1", "loopback"), ("169.254.169.254", "link-local"), ("10.1.2.3", None)]


def test_transition_form_decoding() -> None:
    assert transition_form(ipaddress.IPv6Address(_6to4("192.0.2.33"))) == TransitionForm(
        "6to4", (ipaddress.IPv4Address("192.0.2.33"),), True
    )
    # The RFC 4380 §4 example: server 65.54.227.120, client 192.0.2.45 port 40000.
    t = transition_form(ipaddress.IPv6Address("2001:0000:4136:e378:8000:63bf:3fff:fdd2"))
    assert t is not None and t.name == "teredo"
    assert t.embedded == (
        ipaddress.IPv4Address("65.54.227.120"),
        ipaddress.IPv4Address("192.0.2.45"),
    )
    assert transition_form(ipaddress.IPv6Address("::ffff:0:c000:221")).name == "siit"  # type: ignore[union-attr]
    isatap = transition_form(ipaddress.IPv6Address("2001:db8:1:2:200:5efe:7f00:1"))
    assert isatap is not None and isatap.name == "isatap" and not isatap.prefix_refused
    for plain in ["::", "::1", "2001:db8::1", "fe80::1", "2606:4700::1111"]:
        assert transition_form(ipaddress.IPv6Address(plain)) is None


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize(("inner", "rule"), INNER)
@pytest.mark.parametrize("make", [restricted, permissive])
def test_transition_forms_refused(
    make: type[PeerPolicy], form: str, inner: str, rule: str | None
) -> None:
    """Embedded loopback/link-local are refused by the IPv4 rule; and the prefix itself is
    refused even when the embedded address would be fine (10.x in restricted mode) or is listed
    in allowed_peers (127.0.0.1, as in the demo and the tests)."""
    peer = FORMS[form](inner)
    v = make().check(peer)
    assert not v.allowed
    if rule is not None:
        assert v.rule == f"{form}/{rule}"
    v = make(allowed=[inner]).check(peer)
    assert not v.allowed and v.rule == form, v


def test_transition_forms_teredo_server_address_is_judged_too() -> None:
    v = restricted().check(_teredo("8.8.8.8", server="127.0.0.1"))
    assert not v.allowed and v.rule == "teredo/loopback"


def test_transition_prefix_allowed_only_when_listed() -> None:
    for peer in [_6to4("8.8.8.8"), _teredo("8.8.8.8"), _siit("8.8.8.8"), "::8.8.8.8"]:
        assert not restricted().check(peer).allowed
        pol = restricted(allowed=["2002::/16", "2001::/32", "::ffff:0:0:0/96", "::/96"])
        assert pol.check(peer).allowed, peer
    # Listing the prefix never lets an embedded loopback or link-local through...
    pol = restricted(allowed=["2002::/16", "2001::/32"])
    assert not pol.check(_6to4("127.0.0.1")).allowed
    assert not pol.check(_teredo("169.254.169.254")).allowed
    # ...nor a denied one.
    assert (
        not restricted(allowed=["2002::/16"], denied=["8.8.8.0/24"]).check(_6to4("8.8.8.8")).allowed
    )
    assert (
        not restricted(allowed=["2002::/16"], denied=["2002:808::/32"])
        .check(_6to4("8.8.8.8"))
        .allowed
    )


def test_transition_form_of_relay_address_keeps_relay_ports_only() -> None:
    pol = PeerPolicy(
        permissive=False,
        allowed=["2002::/16"],
        relay_addresses=["203.0.113.5"],
        relay_ports=(49152, 65535),
    )
    v = pol.check(_6to4("203.0.113.5"))
    assert v.allowed and v.relay_ports_only
    assert not pol.port_allowed(v, 3478)


def test_isatap_judged_by_embedded_address() -> None:
    assert not restricted().check("2001:db8:1:2:0:5efe:7f00:1").allowed
    assert not restricted().check("2001:db8:1:2:200:5efe:a9fe:a9fe").allowed
    assert restricted().check("2001:db8:1:2:200:5efe:808:808").allowed


def test_6to4_relay_anycast_refused() -> None:
    v = restricted().check("192.88.99.1")  # RFC 7526
    assert not v.allowed and v.rule == "6to4-relay"


def test_host_addresses_refused_unless_allowed() -> None:
    pol = restricted(allowed=["127.0.0.1", "192.0.2.77"])
    assert pol.check("192.0.2.2").allowed
    assert pol.set_host_addresses(["127.0.0.1", "192.0.2.2", "fd00::2", "fe80::1%eth0", "bogus"])
    assert not pol.set_host_addresses(["192.0.2.2", "127.0.0.1", "fe80::1%eth0", "fd00::2"])
    for peer in ["192.0.2.2", "::ffff:192.0.2.2", "64:ff9b::c000:202", "fd00::2"]:
        v = pol.check(peer)
        assert not v.allowed and v.rule == "host-address", peer
    v = pol.check(_6to4("192.0.2.2"))
    assert not v.allowed and v.rule == "6to4/host-address"
    assert pol.check("127.0.0.1").allowed  # listed in allowed_peers: stays allowed
    assert pol.set_host_addresses(["127.0.0.1", "192.0.2.77"])
    assert pol.check("192.0.2.2").allowed  # gone from the host: a peer again (cache dropped)
    assert pol.check("192.0.2.77").allowed  # a host address that is listed stays allowed


def test_host_address_that_is_the_relay_stays_relay_ports_only() -> None:
    pol = PeerPolicy(permissive=False, relay_addresses=["192.0.2.2"], relay_ports=(49152, 65535))
    pol.set_host_addresses(["192.0.2.2", "192.0.2.3"])
    v = pol.check("192.0.2.2")
    assert v.allowed and v.relay_ports_only
    assert not pol.check("192.0.2.3").allowed


def test_isatap_inside_6to4_is_judged_too() -> None:
    pol = restricted(allowed=["2002::/16"])
    assert pol.check("2002:808:808:1:0:5efe:808:808").allowed
    v = pol.check("2002:808:808:1:0:5efe:7f00:1")
    assert not v.allowed and v.rule == "6to4/loopback"
