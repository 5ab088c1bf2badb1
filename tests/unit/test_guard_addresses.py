"""Source normalisation, ban-table lookups and the trusted-proxy client address."""

from __future__ import annotations

import pytest

from confedge.guard.addresses import (
    client_address,
    normalise_ip,
    normalise_source,
    parse_networks,
)
from confedge.guard.bantable import BanTable
from confedge.guard.core import BanRecord

NOW = 1_700_000_000.0


def rec(source: str, left: float = 100.0) -> BanRecord:
    return BanRecord(source, NOW - 1, NOW + left, 1, 10, "test")


def test_normalise_ip_forms() -> None:
    assert normalise_ip("2001:DB8:0:0::1") == "2001:db8::1"
    assert normalise_ip("[2001:db8::1]") == "2001:db8::1"
    assert normalise_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert normalise_ip(" 192.0.2.1 ") == "192.0.2.1"
    with pytest.raises(ValueError, match=r'"999\.1\.1\.1" is not an IP address'):
        normalise_ip("999.1.1.1")


def test_normalise_source_accepts_address_and_v6_slash64_only() -> None:
    assert normalise_source("2001:db8:1:2:3::/64") == "2001:db8:1:2::/64"
    assert normalise_source("192.0.2.1/32") == "192.0.2.1"
    with pytest.raises(ValueError, match="block wider networks in the firewall"):
        normalise_source("192.0.2.0/24")
    with pytest.raises(ValueError, match="not an IP address or IPv6 /64"):
        normalise_source("nonsense/64")


def test_bantable_lookups() -> None:
    t = BanTable(clock=lambda: NOW)
    assert t.check("192.0.2.1") is None  # empty table
    t.rebuild(
        [
            rec("192.0.2.1"),
            rec("2001:db8::7", 50),
            rec("2001:db8:5:6::/64", 70),
            rec("192.0.2.9", -1),
        ],
        NOW,
    )
    assert len(t) == 3  # the expired one is not loaded
    assert t.check("192.0.2.1") == 100
    assert t.check("192.0.2.2") is None
    assert t.check("192.0.2.9") is None
    assert t.check("2001:db8::7") == 50
    assert t.check("2001:0db8:0000::0007") == 50  # non-canonical spelling
    assert t.check("2001:db8::8") is None
    assert t.check("2001:db8:5:6:ffff::1") == 70
    assert t.check("::ffff:192.0.2.1") == 100  # IPv4-mapped (dual-stack socket)
    assert t.check("not-an-ip:") is None
    assert t.check("fe80::1%eth0") is None
    t.add(rec("2001:db8:5:6::1", 90))  # address ban longer than its /64 ban: the longer wins
    assert t.check("2001:db8:5:6::1") == 90
    t.discard("192.0.2.1")
    assert t.check("192.0.2.1") is None


def test_bantable_expiry_by_clock() -> None:
    now = [NOW]
    t = BanTable(clock=lambda: now[0])
    t.add(rec("192.0.2.1", 10))
    assert t.check("192.0.2.1") == 10
    now[0] += 10
    assert t.check("192.0.2.1") is None


TRUSTED = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


def test_client_address_untrusted_peer_ignores_xff() -> None:
    assert client_address("198.51.100.1", "203.0.113.9", TRUSTED) == "198.51.100.1"
    assert client_address("198.51.100.1", None, TRUSTED) == "198.51.100.1"
    assert client_address("10.0.0.2", "203.0.113.9", ()) == "10.0.0.2"


def test_client_address_walks_trusted_hops_right_to_left() -> None:
    assert client_address("10.0.0.2", "203.0.113.9", TRUSTED) == "203.0.113.9"
    # The client forged a leftmost entry; the hop our proxy appended is what counts.
    assert client_address("10.0.0.2", "1.2.3.4, 203.0.113.9", TRUSTED) == "203.0.113.9"
    # Two trusted proxies in a row.
    assert client_address("10.0.0.2", "203.0.113.9, 10.0.0.3", TRUSTED) == "203.0.113.9"
    assert client_address("::ffff:10.0.0.2", "[2001:db8::5]:443", TRUSTED) == "2001:db8::5"
    assert client_address("2001:db8:ffff::1", "203.0.113.9:5555", TRUSTED) == "203.0.113.9"
    # Garbage stops the walk at the last trustworthy hop.
    assert client_address("10.0.0.2", "203.0.113.9, garbage", TRUSTED) == "10.0.0.2"
    # Only trusted hops: the leftmost.
    assert client_address("10.0.0.2", "10.0.0.5, 10.0.0.3", TRUSTED) == "10.0.0.5"
    # CIDR strings work too (parsed per call: slower, for callers that have not precompiled).
    assert client_address("10.0.0.2", "203.0.113.9", ["10.0.0.0/8"]) == "203.0.113.9"
