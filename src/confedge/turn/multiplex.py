"""Shared relay sockets (``turn.relay_multiplex``): which allocation a peer's datagram is for.

Why: with one relay port per allocation the kernel demultiplexes by destination port, and the
relay port range caps the number of allocations (16,384 with the default range). With a few
shared sockets many allocations have the *same* relayed transport address (RFC 8656 §2 calls it
the allocation's; here several allocations share it), so the server must tell them apart by the
one thing left in a peer's datagram: the peer's source transport address (IP and port).

The rules, implemented here for the Python data plane and mirrored in C (``_native.c``, "mux"):

* **Claims.** An allocation claims a peer transport address on its shared socket when its client
  names that exact address: a ChannelBind (RFC 8656 §11) or a Send indication (§10.2, once the
  permission for the IP exists). A claim is exclusive on its socket.
* **Conflict.** A second allocation on the same socket naming an address already claimed: its
  ChannelBind is refused (:class:`~.dataplane.PeerTaken`, the core answers 508) and its Send
  indication is dropped and counted (indications get no answer, §10.2). Conflicts are why
  there are several sockets: new allocations go to the socket with the fewest allocations.
* **Unknown peer.** A datagram from an address nobody claimed is delivered when exactly one
  allocation on the socket has a permission for its IP (a peer answering from a port the client
  has not named yet, e.g. an ICE check from a peer-reflexive address), else dropped and counted
  (``unknown``: no allocation has a permission, §9; ``ambiguous``: several have).
* **Limit.** An allocation holds at most :data:`MAX_CLAIMS` claims (a client spraying Send
  indications over a permitted IP's 65,535 ports must not grow the table without bound, as
  coturn's ``--multiplex-peer-max-peers``); beyond it, as for a conflict.
* **Expiry.** A Send claim lasts while its permission does (§9: the permission is what allowed
  the Send); a channel claim while its channel does (§11). A permission's expiry releases the
  Send claims for its IP, a channel's expiry its channel claim, the allocation's end all of its
  claims: the address is then free for another allocation.

``Owner`` is whatever the data plane keeps per allocation (hashable by identity).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["CHANNEL", "MAX_CLAIMS", "SEND", "PeerMux"]

CHANNEL = 1  # claimed by a ChannelBind
SEND = 2  # claimed by a Send indication
MAX_CLAIMS = 1024  # peer transport addresses one allocation may claim (_native.c MUX_MAX_CLAIMS)

Owner = TypeVar("Owner", bound=Hashable)
Peer = tuple[str, int]


class PeerMux(Generic[Owner]):
    """The demultiplexing table of one shared relay socket (sans-I/O)."""

    __slots__ = ("ambiguous", "claims", "conflicts", "owned", "perms", "unknown")

    def __init__(self) -> None:
        self.claims: dict[Peer, tuple[Owner, int]] = {}  # peer -> (owner, CHANNEL|SEND bits)
        self.owned: dict[Owner, set[Peer]] = {}  # owner -> its claims (release in O(own))
        self.perms: dict[str, set[Owner]] = {}  # peer IP -> owners with a permission for it
        self.unknown = 0  # datagrams from unclaimed peers no allocation has a permission for
        self.ambiguous = 0  # ... several allocations have a permission for
        self.conflicts = 0  # Send indications to a peer another allocation claimed

    def owner_of(self, peer: Peer) -> Owner | None:
        entry = self.claims.get(peer)
        return entry[0] if entry is not None else None

    def claim(self, owner: Owner, peer: Peer, how: int) -> str:
        """Claim ``peer`` for ``owner``: "" when done, else why not (nothing changes then)."""
        entry = self.claims.get(peer)
        if entry is None:
            mine = self.owned.setdefault(owner, set())
            if len(mine) >= MAX_CLAIMS:
                return f"the allocation already uses {MAX_CLAIMS} peer addresses"
            self.claims[peer] = (owner, how)
            mine.add(peer)
            return ""
        if entry[0] is not owner:
            return "in use by another allocation"
        self.claims[peer] = (owner, entry[1] | how)
        return ""

    def release(self, owner: Owner, peer: Peer, how: int) -> None:
        """Drop ``how`` from ``owner``'s claim of ``peer``; the claim ends with its last reason."""
        entry = self.claims.get(peer)
        if entry is None or entry[0] is not owner:
            return
        left = entry[1] & ~how
        if left:
            self.claims[peer] = (owner, left)
            return
        del self.claims[peer]
        mine = self.owned.get(owner)
        if mine is not None:
            mine.discard(peer)
            if not mine:
                del self.owned[owner]

    def add_permission(self, owner: Owner, ip: str) -> None:
        self.perms.setdefault(ip, set()).add(owner)

    def remove_permission(self, owner: Owner, ip: str) -> None:
        """The permission for ``ip`` lapsed (§9): its Send claims go with it."""
        holders = self.perms.get(ip)
        if holders is not None:
            holders.discard(owner)
            if not holders:
                del self.perms[ip]
        for peer in [p for p in self.owned.get(owner, ()) if p[0] == ip]:
            self.release(owner, peer, SEND)

    def remove(self, owner: Owner, ips: Iterable[str]) -> None:
        """The allocation ended: its claims and its permissions (``ips``) leave the tables."""
        for peer in self.owned.pop(owner, set()):
            self.claims.pop(peer, None)
        for ip in ips:
            self.remove_permission(owner, ip)

    def route(self, peer: Peer) -> Owner | None:
        """The allocation a datagram from ``peer`` is for, or None (dropped, counted)."""
        entry = self.claims.get(peer)
        if entry is not None:
            return entry[0]
        holders = self.perms.get(peer[0])
        if holders is None:
            self.unknown += 1
            return None
        if len(holders) != 1:
            self.ambiguous += 1
            return None
        return next(iter(holders))
