"""What the wizard reads from the host it runs on: its addresses and its name.

The reference's wizard reads the NICs from /sys/class/net and their addresses from `ip addr`;
confedge leaves OS networking to the host and only offers what is there as choices (SPEC §6), so
an operator picks an address instead of typing one (and a typo in an address is the most common
reason a freshly installed edge relays nothing).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

__all__ = ["HostAddress", "host_addresses", "host_names"]


@dataclass(frozen=True)
class HostAddress:
    address: str
    interface: str

    @property
    def label(self) -> str:
        return f"{self.address} ({self.interface})"


def host_addresses() -> list[HostAddress]:
    """The host's unicast addresses: global and private first, loopback last, no link-local.

    Link-local IPv6 addresses need a zone and are never what a conferencing node or an Internet
    client reaches, so they are left out.
    """
    found: list[HostAddress] = []
    # psutil, as TURN's own-address watch uses (turn/service.py): one library reads the NICs.
    for name, addrs in psutil.net_if_addrs().items():
        for entry in addrs:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                addr = ipaddress.ip_address(entry.address.split("%")[0])
            except ValueError:
                continue
            if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
                continue
            found.append(HostAddress(str(addr), name))
    found.sort(
        key=lambda h: (
            ipaddress.ip_address(h.address).is_loopback,
            ipaddress.ip_address(h.address).version,
        )
    )
    seen: set[str] = set()
    unique = []
    for h in found:
        if h.address not in seen:
            seen.add(h.address)
            unique.append(h)
    return unique


def host_names() -> tuple[str, str]:
    """(host name, domain) as the host knows itself; domain "localdomain" when it has none."""
    fqdn = socket.getfqdn()
    short = socket.gethostname().split(".")[0] or "edge"
    if "." in fqdn and fqdn.split(".")[0] == short:
        return short, fqdn.split(".", 1)[1]
    return short, "localdomain"
