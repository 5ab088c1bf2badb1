"""The TURN data plane: relay sockets and the per-packet forwarding tables.

Why a separate layer: the control plane (``core.py``) decides *what* may be relayed -- permissions,
channels, lifetimes, quotas -- at request rate, while this layer moves packets at media rate.
Once a permission or channel exists, forwarding is a dictionary lookup and one ``sendto``
(DESIGN "hot paths").  :class:`DataPlane` is the contract; :class:`UdpDataPlane` implements it
with one uvloop ``DatagramProtocol`` per relay port.  A native backend with batched syscalls
(recvmmsg/sendmmsg) can implement the same interface without touching the core.

Directions:

* peer -> client: :class:`_RelayProtocol.datagram_received` looks the peer transport address up
  in the channel table (RFC 8656 §12: ChannelData when a channel is bound) or the peer IP in the
  permission set (§10.3: a Data indication); anything else is dropped (§9: no permission).
* client -> peer, ChannelData: :meth:`UdpDataPlane.client_channel_data` (called by the
  listeners before any STUN parsing) finds the route by (client, channel number) and sends.
* client -> peer, Send indication: the core parses and checks, then calls :meth:`send_to_peer`.

A channel relays only while its peer IP holds a permission (RFC 8656 §9, §12): when the core
calls :meth:`DataPlane.remove_permission` (the permission lapsed), the channels bound to that IP
leave the two hot-path tables but stay bound; :meth:`DataPlane.add_permission` (a CreatePermission
or a ChannelBind refresh) puts them back.  So neither direction checks permissions per packet.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from .bandwidth import TokenBucket
from .multiplex import CHANNEL, SEND, PeerMux
from .portdraw import PortDraw, PortTable

__all__ = [
    "AllocationCounters",
    "CapacityError",
    "ClientSink",
    "DataPlane",
    "PeerTaken",
    "RelayGrant",
    "UdpDataPlane",
]

log = logging.getLogger("confedge.turn")

_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", _COOKIE)
_DATA_INDICATION = 0x0017  # method DATA (0x007), class indication (RFC 8489 §5)
_XOR_PEER_ADDRESS = 0x0012
_DATA = 0x0013
# Linux values (not exported by the socket module on every Python build).
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by len % 4
# Bandwidth directions (bandwidth.py): each has its own buckets, as coturn's max-bps counts
# input and output separately.
TO_PEER = 0
TO_CLIENT = 1
Buckets = tuple[TokenBucket | None, ...]
# charge(direction, nbytes) -> sent?: another plane's shared buckets (native.py).
Charge = Callable[[int, int], bool]
_CD_HEAD = struct.Struct("!HH").pack  # ChannelData header: channel number, length
STREAM_HIGH_WATER = 256 * 1024  # bytes queued to a TCP client beyond which relayed packets drop


class CapacityError(Exception):
    """No relay port could be bound (range exhausted, EVEN-PORT pair unavailable, bad token).

    The core answers 508 Insufficient Capacity (RFC 8656 §7.2)."""


class PeerTaken(CapacityError):
    """Shared relay sockets (``turn.relay_multiplex``): another allocation on the same socket
    has claimed this peer transport address, so its datagrams could not be told apart
    (turn/multiplex.py).  The core answers the ChannelBind 508."""


@dataclass(slots=True)
class ClientSink:
    """Where relayed data for one client goes.

    ``addr`` is the client's address on a datagram listener; ``None`` means a stream transport
    (TCP/TLS) where ChannelData must be padded to a multiple of 4 bytes (RFC 8656 §12.5).
    """

    transport: Any  # asyncio.DatagramTransport (addr set) or asyncio.Transport (addr None)
    addr: tuple[str, int] | None


@dataclass(slots=True)
class RelayGrant:
    """The result of :meth:`DataPlane.add_allocation`."""

    family: int  # 4 or 6
    ip: str
    port: int


@dataclass(slots=True)
class AllocationCounters:
    """Traffic of one allocation, for the end-of-allocation log line and stats."""

    pkts_to_peer: int = 0
    bytes_to_peer: int = 0
    pkts_to_client: int = 0
    bytes_to_client: int = 0
    dropped: int = 0  # peer packets without a permission
    dropped_bandwidth: int = 0  # packets (either direction) over a bandwidth cap


class DataPlane(abc.ABC):
    """Relay backend contract used by :class:`confedge.turn.core.TurnCore`.

    Every method is synchronous and cheap (no awaiting): the core runs inside a datagram
    callback.  ``alloc_id`` is an opaque integer chosen by the core; ``client_key`` is the opaque
    hashable key the listener uses for :meth:`client_channel_data`.
    """

    @abc.abstractmethod
    def add_allocation(
        self,
        alloc_id: int,
        family: int,
        client_key: Hashable,
        sink: ClientSink,
        *,
        even_port: bool = False,
        reserve_token: bytes | None = None,
        use_token: bytes | None = None,
        dont_fragment: bool = False,
        user: str = "",
    ) -> RelayGrant:
        """Bind a relay port.  ``even_port``: RFC 8656 §7.2 EVEN-PORT; ``reserve_token``: also
        hold port+1 under that token (EVEN-PORT R bit); ``use_token``: take the port held by an
        earlier reservation.  ``user``: the username, whose allocations share the per-user
        bandwidth bucket.  Raises :class:`CapacityError`."""

    @abc.abstractmethod
    def set_bandwidth(self, per_allocation: int, per_user: int, total: int) -> None:
        """Bandwidth caps in bytes/s (0 = unlimited), each direction on its own, for every
        allocation, live and future (bandwidth.py explains the buckets)."""

    @abc.abstractmethod
    def set_allocation_rate(self, alloc_id: int, rate: int) -> None:
        """Change one allocation's cap (the "degrade" policy's even share); 0 = unlimited."""

    @abc.abstractmethod
    def release_reservation(self, token: bytes) -> None:
        """Free a port held for a RESERVATION-TOKEN that was never used (or expired)."""

    @abc.abstractmethod
    def remove_allocation(self, alloc_id: int) -> AllocationCounters:
        """Close the relay port; return the final counters."""

    @abc.abstractmethod
    def families(self) -> frozenset[int]:
        """Address families (4, 6) this backend can relay on (RFC 6156)."""

    @abc.abstractmethod
    def add_permission(self, alloc_id: int, peer_ip: str) -> None: ...

    @abc.abstractmethod
    def remove_permission(self, alloc_id: int, peer_ip: str) -> None:
        """The permission lapsed: nothing to or from ``peer_ip`` is relayed, also on channels
        bound to it (RFC 8656 §9, §12), which stay bound and relay again after
        :meth:`add_permission` for the same IP."""

    @abc.abstractmethod
    def add_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None: ...

    @abc.abstractmethod
    def remove_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None: ...

    @abc.abstractmethod
    def send_to_peer(self, alloc_id: int, peer: tuple[str, int], payload: bytes) -> None:
        """Send indication payload (permission already checked by the core)."""

    @abc.abstractmethod
    def client_channel_data(self, client_key: Hashable, data: bytes) -> bool:
        """Fast path for ChannelData from a client; False when no such channel (drop)."""

    @abc.abstractmethod
    def counters(self, alloc_id: int) -> AllocationCounters: ...

    @abc.abstractmethod
    def totals(self) -> AllocationCounters:
        """Counters summed over live and ended allocations (for stats())."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every relay socket."""


def _taken(peer: tuple[str, int], relay: tuple[str, int], why: str) -> str:
    return (
        f"peer {peer[0]}:{peer[1]} on the shared relay socket {relay[0]}:{relay[1]}: {why} "
        "(turn.relay_multiplex)"
    )


def _xor_peer_v4(ip: str, port: int) -> bytes:
    # RFC 8489 §14.2: X-Port = port ^ (cookie >> 16); X-Address = address ^ cookie.
    raw = socket.inet_aton(ip)
    xaddr = bytes(a ^ b for a, b in zip(raw, _COOKIE_BYTES, strict=True))
    return struct.pack("!HHBBH", _XOR_PEER_ADDRESS, 8, 0, 1, port ^ (_COOKIE >> 16)) + xaddr


def _xor_peer_v6(ip: str, port: int, tid: bytes) -> bytes:
    raw = socket.inet_pton(socket.AF_INET6, ip)
    mask = _COOKIE_BYTES + tid
    xaddr = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    return struct.pack("!HHBBH", _XOR_PEER_ADDRESS, 20, 0, 2, port ^ (_COOKIE >> 16)) + xaddr


class _Route:
    """Client -> peer forwarding entry for one channel (looked up per ChannelData packet)."""

    __slots__ = ("bytes", "peer", "pkts", "relay", "send")

    def __init__(self, relay: _RelayProtocol, peer: tuple[str, int]) -> None:
        self.relay = relay
        self.peer = peer
        self.pkts = 0
        self.bytes = 0
        # The relay transport's own sendto once the loop has adopted the socket (no Python-level
        # wrapper per packet); the wrapper until then.
        self.send: Any = relay.transport.sendto if relay.transport is not None else relay.sendto


class _RelayProtocol(asyncio.DatagramProtocol):
    """One relay port.  ``datagram_received`` is the peer -> client hot path."""

    def __init__(self, alloc_id: int, family: int, sink: ClientSink, sock: socket.socket) -> None:
        self.alloc_id = alloc_id
        self.family = family
        self.sock = sock
        self.port = 0  # its own relay port (0 on a shared socket): freed in the port table
        self.transport: asyncio.DatagramTransport | None = None
        self.stream = sink.addr is None
        self.client_transport = sink.transport
        self.client_addr = sink.addr
        self.perms: set[str] = set()
        # peer (ip, port) -> channel number
        self.channels: dict[tuple[str, int], int] = {}
        self.routes: dict[int, _Route] = {}
        self._xor_cache: dict[tuple[str, int], bytes] = {}
        # Plain attributes rather than a counters object: one lookup less per packet.
        self.pkts_to_client = 0
        self.bytes_to_client = 0
        self.pkts_to_peer = 0  # Send indications; ChannelData is counted on its _Route
        self.bytes_to_peer = 0
        self.dropped = 0
        self.closed = False
        # Bandwidth caps: the (allocation, user, total) buckets of each direction, without the
        # unlimited ones; ``limited`` is the one test the hot path pays when no cap applies.
        self.buckets: tuple[tuple[TokenBucket, ...], tuple[TokenBucket, ...]] = ((), ())
        # Under the native data plane: charge(direction, n) on the engine's per-user and total
        # buckets, which replace this plane's own (UdpDataPlane.share_buckets).
        self.charge: Charge | None = None
        self.limited = False
        self.dropped_bw = 0
        self.shared: _SharedRelay | None = None  # turn.relay_multiplex: the socket it is on

    def set_buckets(
        self, to_peer: Buckets, to_client: Buckets, charge: Charge | None = None
    ) -> None:
        self.buckets = (
            tuple(b for b in to_peer if b is not None and b.rate > 0),
            tuple(b for b in to_client if b is not None and b.rate > 0),
        )
        self.charge = charge
        self.limited = bool(self.buckets[0] or self.buckets[1] or charge)

    def admit(self, n: int, direction: int) -> bool:
        """Spend ``n`` bytes on every bucket of this allocation in ``direction`` (TO_PEER,
        TO_CLIENT), or count a drop (a refused packet takes no tokens anywhere)."""
        now, mine, charge = time.monotonic(), self.buckets[direction], self.charge
        if charge is None:
            if TokenBucket.take_all(now, n, mine):
                return True
        elif TokenBucket.has_all(now, n, mine) and charge(direction, n):
            TokenBucket.spend_all(n, mine)
            return True
        self.dropped_bw += 1
        return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for route in self.routes.values():
            route.send = self.transport.sendto  # type: ignore[union-attr]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from peers (port unreachable) are expected on a relay; not worth a log line.
        pass

    def sendto(self, data: bytes, peer: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, peer)
            return
        # Before the loop has adopted the socket (a few microseconds after Allocate).
        with contextlib.suppress(OSError):
            self.sock.sendto(data, peer)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.family == 6:
            addr = (addr[0], addr[1])
        n = len(data)
        ch = self.channels.get(addr)
        if ch is not None:
            # RFC 8656 §12.4: ChannelData to the client when a channel is bound to this peer.
            out = _CD_HEAD(ch, n) + data
            if self.stream:
                out += _PAD[n & 3]  # §12.5: padded over stream transports
        elif addr[0] in self.perms:
            out = self._data_indication(addr, data, n)  # §10.3
        else:
            self.dropped += 1  # §9: no permission for this peer IP
            return
        if self.limited and not self.admit(n, TO_CLIENT):
            return
        if self.client_addr is None:
            if self.client_transport.get_write_buffer_size() > STREAM_HIGH_WATER:
                self.dropped += 1  # client not reading: drop media, do not buffer
                return
            self.client_transport.write(out)
        else:
            self.client_transport.sendto(out, self.client_addr)
        self.pkts_to_client += 1
        self.bytes_to_client += n

    def _data_indication(self, addr: tuple[Any, ...], data: bytes, n: int) -> bytes:
        tid = os.urandom(12)
        if self.family == 4:
            xpa = self._xor_cache.get(addr)
            if xpa is None:
                if len(self._xor_cache) > 1024:
                    self._xor_cache.clear()
                xpa = self._xor_cache[addr] = _xor_peer_v4(addr[0], addr[1])
        else:
            xpa = _xor_peer_v6(addr[0], addr[1], tid)
        pad = _PAD[n & 3]
        length = len(xpa) + 4 + n + len(pad)
        head = struct.pack("!HH", _DATA_INDICATION, length) + _COOKIE_BYTES + tid
        return b"".join((head, xpa, struct.pack("!HH", _DATA, n), data, pad))


class _UdpV4RelayProtocol(_RelayProtocol):
    """The common case -- IPv4 relay, UDP client -- with the channel path inlined."""

    def __init__(self, alloc_id: int, family: int, sink: ClientSink, sock: socket.socket) -> None:
        super().__init__(alloc_id, family, sink, sock)
        self._client_sendto = sink.transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        ch = self.channels.get(addr)
        if ch is None:
            _RelayProtocol.datagram_received(self, data, addr)
            return
        n = len(data)
        if self.limited and not self.admit(n, TO_CLIENT):
            return
        self._client_sendto(_CD_HEAD(ch, n) + data, self.client_addr)
        self.pkts_to_client += 1
        self.bytes_to_client += n


class _SharedRelay(asyncio.DatagramProtocol):
    """One shared relay socket (``turn.relay_multiplex``): hands each peer datagram to the
    allocation :class:`PeerMux` routes it to, whose own ``datagram_received`` relays it."""

    def __init__(self, family: int, sock: socket.socket) -> None:
        self.family = family
        self.sock = sock
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.transport: asyncio.DatagramTransport | None = None
        self.mux: PeerMux[_RelayProtocol] = PeerMux()
        self.members: set[_RelayProtocol] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for proto in self.members:
            proto.connection_made(transport)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from peers, as on a relay port of its own

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        proto = self.mux.route((addr[0], addr[1]))
        if proto is not None:
            proto.datagram_received(data, addr)


@dataclass(slots=True)
class _Reservation:
    sock: socket.socket
    family: int
    port: int


class UdpDataPlane(DataPlane):
    """Pure-Python (uvloop) relay backend: one datagram endpoint per allocation."""

    MAX_BIND_TRIES = 64

    def __init__(
        self,
        *,
        relay_v4: str | None,
        relay_v6: str | None,
        port_range: tuple[int, int],
        loop: asyncio.AbstractEventLoop | None = None,
        rng: PortDraw | None = None,
        multiplex: int = 0,
    ) -> None:
        self.relay_ip = {4: relay_v4, 6: relay_v6}
        self._families = frozenset(f for f, ip in self.relay_ip.items() if ip)  # every Allocate
        # turn.relay_multiplex: shared relay sockets per family (bound at the first allocation
        # that uses them); 0 = one port per allocation.
        self.multiplex = multiplex
        self._shared: dict[int, list[_SharedRelay]] = {}
        self.port_range = port_range
        self._loop = loop
        self._rng = rng or PortDraw()  # random.SystemRandom's randint, drawn in bulk
        self._ports: dict[int, PortTable] = {}  # family -> the relay ports our sockets hold
        self._relays: dict[int, _RelayProtocol] = {}
        self._client_of: dict[int, Hashable] = {}
        # (client_key, channel number as the 2 header bytes) -> route; see client_channel_data.
        self.routes: dict[tuple[Hashable, bytes], _Route] = {}
        self._reservations: dict[bytes, _Reservation] = {}
        self._ended = AllocationCounters()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Bandwidth caps (bytes/s, 0 = unlimited): see set_bandwidth.
        self._per_allocation = 0
        self._per_user = 0
        self._total = (TokenBucket(0), TokenBucket(0))
        # user -> [(to_peer, to_client) buckets, allocations]
        self._user_buckets: dict[str, list[Any]] = {}
        self._alloc_buckets: dict[int, tuple[TokenBucket, TokenBucket]] = {}
        self._user_of: dict[int, str] = {}
        # alloc_id -> the native engine's per-user and total buckets (share_buckets).
        self._charges: dict[int, Charge] = {}

    # -- bandwidth caps -----------------------------------------------------------------------

    def set_bandwidth(self, per_allocation: int, per_user: int, total: int) -> None:
        self._per_allocation, self._per_user = per_allocation, per_user
        for b in self._total:
            b.set_rate(total)
        for entry in self._user_buckets.values():
            for b in entry[0]:
                b.set_rate(per_user)
        for alloc_id, pair in self._alloc_buckets.items():
            for b in pair:
                b.set_rate(per_allocation)
            self._rebucket(alloc_id)

    def set_allocation_rate(self, alloc_id: int, rate: int) -> None:
        pair = self._alloc_buckets.get(alloc_id)
        if pair is not None and pair[0].rate != rate:
            for b in pair:
                b.set_rate(rate)
            self._rebucket(alloc_id)

    def share_buckets(self, alloc_id: int, charge: Charge) -> None:
        """The native data plane's stream clients: this allocation's per-user and total caps
        are ``charge`` (the engine's buckets, shared with its UDP clients), not this plane's."""
        self._charges[alloc_id] = charge
        self._rebucket(alloc_id)

    def _rebucket(self, alloc_id: int) -> None:
        proto = self._relays.get(alloc_id)
        if proto is None:
            return
        mine = self._alloc_buckets[alloc_id]
        charge = self._charges.get(alloc_id)
        if charge is not None:
            capped = self._per_user or self._total[TO_PEER].rate
            proto.set_buckets((mine[TO_PEER],), (mine[TO_CLIENT],), charge if capped else None)
            return
        entry = self._user_buckets.get(self._user_of.get(alloc_id, ""))
        user = entry[0] if entry else (None, None)
        proto.set_buckets(
            (mine[TO_PEER], user[TO_PEER], self._total[TO_PEER]),
            (mine[TO_CLIENT], user[TO_CLIENT], self._total[TO_CLIENT]),
        )

    def _attach_buckets(self, alloc_id: int, user: str) -> None:
        now = time.monotonic()
        rate = self._per_allocation
        self._alloc_buckets[alloc_id] = (TokenBucket(rate, now=now), TokenBucket(rate, now=now))
        entry = self._user_buckets.get(user)
        if entry is None:
            pair = (TokenBucket(self._per_user, now=now), TokenBucket(self._per_user, now=now))
            entry = self._user_buckets[user] = [pair, 0]
        entry[1] += 1
        self._user_of[alloc_id] = user
        self._rebucket(alloc_id)

    def _detach_buckets(self, alloc_id: int) -> None:
        self._alloc_buckets.pop(alloc_id, None)
        self._charges.pop(alloc_id, None)
        user = self._user_of.pop(alloc_id, None)
        entry = self._user_buckets.get(user) if user is not None else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._user_buckets[user]  # type: ignore[arg-type]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def families(self) -> frozenset[int]:
        return self._families

    # -- relay sockets ------------------------------------------------------------------------

    def _bind(self, family: int, port: int) -> socket.socket | None:
        ip = self.relay_ip[family]
        assert ip is not None
        # Non-blocking from socket(2) on (SOCK_NONBLOCK): one syscall less per Allocate.
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise CapacityError(f"cannot bind relay {ip}:{port}: {exc.strerror}") from None
        return sock

    def _table(self, family: int) -> PortTable:
        table = self._ports.get(family)
        if table is None:
            table = self._ports[family] = PortTable(*self.port_range, self._rng)
        return table

    def release_port(self, family: int, port: int) -> None:
        """A relay socket of ours on ``port`` was closed (here, or by the native engine)."""
        table = self._ports.get(family)
        if table is not None:
            table.free(port)

    def _pick(
        self, family: int, even: bool, pair: bool
    ) -> tuple[socket.socket, socket.socket | None]:
        """A random port of turn.relay_ports that none of our sockets holds (turn/portdraw.py
        PortTable); a port another program holds (EADDRINUSE) is skipped for the rest of this
        search.  ``pair``: port + 1 bound too (EVEN-PORT's R bit)."""
        table = self._table(family)
        foreign: list[int] = []
        try:
            for _ in range(self.MAX_BIND_TRIES):
                port = table.candidate(even, pair)
                if port < 0:
                    break
                sock = self._bind(family, port)
                if sock is None:
                    table.hold(port)
                    foreign.append(port)
                    continue
                if not pair:
                    table.hold(port)
                    return sock, None
                nxt = self._bind(family, port + 1)
                if nxt is not None:
                    table.hold(port)
                    table.hold(port + 1)
                    return sock, nxt
                sock.close()
                table.hold(port + 1)
                foreign.append(port + 1)
        finally:
            for port in foreign:
                table.free(port)
        lo, hi = self.port_range
        if foreign:
            raise CapacityError(
                f"no free relay port in {lo}-{hi}: {table.count} held by allocations, "
                f"{len(foreign)} tried and found bound by other programs"
            )
        raise CapacityError(f"no free relay port in {lo}-{hi}: all {table.count} held")

    def add_allocation(
        self,
        alloc_id: int,
        family: int,
        client_key: Hashable,
        sink: ClientSink,
        *,
        even_port: bool = False,
        reserve_token: bytes | None = None,
        use_token: bytes | None = None,
        dont_fragment: bool = False,
        user: str = "",
    ) -> RelayGrant:
        if self.multiplex and not (reserve_token or use_token or dont_fragment):
            return self._add_shared(alloc_id, family, client_key, sink, user)
        sock = self.relay_socket(
            family,
            even_port=even_port,
            reserve_token=reserve_token,
            use_token=use_token,
            dont_fragment=dont_fragment,
        )
        proto = self._new_relay(alloc_id, family, client_key, sink, sock, user)
        ip, port = sock.getsockname()[:2]
        proto.port = port
        # The loop adopts the already-bound socket asynchronously; the grant is valid right away
        # (packets that arrive meanwhile wait in the kernel buffer).
        self._spawn(self._adopt(proto))
        return RelayGrant(family, ip, port)

    def _new_relay(
        self,
        alloc_id: int,
        family: int,
        client_key: Hashable,
        sink: ClientSink,
        sock: socket.socket,
        user: str,
    ) -> _RelayProtocol:
        """The allocation's relay protocol on ``sock`` (its own or a shared one), registered."""
        cls = _UdpV4RelayProtocol if family == 4 and sink.addr is not None else _RelayProtocol
        proto = cls(alloc_id, family, sink, sock)
        self._relays[alloc_id] = proto
        self._client_of[alloc_id] = client_key
        self._attach_buckets(alloc_id, user)
        return proto

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop, kept referenced until done (cancelled by :meth:`close`)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shared_sockets(self, family: int, count: int) -> list[socket.socket]:
        """``count`` fresh relay sockets of ``family`` to share (``turn.relay_multiplex``; the
        native plane owns and polls its own).  Raises :class:`CapacityError`."""
        if not self.relay_ip.get(family):
            raise CapacityError(f"no IPv{family} relay address")
        socks: list[socket.socket] = []
        try:
            for _ in range(count):  # even ports: EVEN-PORT allocations (§7.2) fit on them too
                socks.append(self._pick(family, True, False)[0])
        except CapacityError:
            for s in socks:
                s.close()
            raise
        return socks

    def _add_shared(
        self, alloc_id: int, family: int, client_key: Hashable, sink: ClientSink, user: str
    ) -> RelayGrant:
        """An allocation on the shared socket with the fewest allocations (turn/multiplex.py);
        the shared ports are even, so EVEN-PORT (RFC 8656 §7.2) is met; an EVEN-PORT with the
        R bit (a reserved port pair), a RESERVATION-TOKEN or DONT-FRAGMENT (DF is set on the
        socket) keeps a port of its own."""
        shared = self._shared.get(family)
        if shared is None:  # the first allocation binds them (CapacityError: 508, try again)
            shared = [_SharedRelay(family, s) for s in self.shared_sockets(family, self.multiplex)]
            self._shared[family] = shared
            for relay in shared:
                self._spawn(self._adopt_shared(relay))
        relay = min(shared, key=lambda r: len(r.members))
        proto = self._new_relay(alloc_id, family, client_key, sink, relay.sock, user)
        proto.shared = relay
        if relay.transport is not None:
            proto.connection_made(relay.transport)
        relay.members.add(proto)
        return RelayGrant(family, relay.addr[0], relay.addr[1])

    async def _adopt_shared(self, relay: _SharedRelay) -> None:
        try:
            await self.loop.create_datagram_endpoint(lambda: relay, sock=relay.sock)
        except (OSError, ValueError) as exc:
            log.warning("shared relay socket adoption failed: %s", exc)

    def mux_stats(self) -> dict[str, int]:
        """Shared sockets: datagrams dropped because no allocation (``unknown``) or more than
        one (``ambiguous``) could take them, and Send indications refused by a claim of
        another allocation (``conflict``)."""
        relays = [r for rs in self._shared.values() for r in rs]
        return {
            "mux_sockets": len(relays),
            "drop_mux_unknown": sum(r.mux.unknown for r in relays),
            "drop_mux_ambiguous": sum(r.mux.ambiguous for r in relays),
            "drop_mux_conflict": sum(r.mux.conflicts for r in relays),
        }

    def relay_socket(
        self,
        family: int,
        *,
        even_port: bool = False,
        reserve_token: bytes | None = None,
        use_token: bytes | None = None,
        dont_fragment: bool = False,
    ) -> socket.socket:
        """A bound, non-blocking relay socket for a new allocation (the arguments as for
        :meth:`add_allocation`).  Shared with the native backend, so both pick ports and keep
        EVEN-PORT reservations the same way.  Raises :class:`CapacityError`."""
        if use_token is not None:
            res = self._reservations.pop(use_token, None)
            if res is None:
                raise CapacityError("unknown or expired RESERVATION-TOKEN")
            if res.family != family:
                res.sock.close()
                self.release_port(res.family, res.port)
                raise CapacityError("RESERVATION-TOKEN is for another address family")
            sock = res.sock
        else:
            if not self.relay_ip.get(family):
                raise CapacityError(f"no IPv{family} relay address")
            sock, nxt = self._pick(family, even_port, reserve_token is not None)
            if nxt is not None and reserve_token is not None:
                self._reservations[reserve_token] = _Reservation(nxt, family, nxt.getsockname()[1])
        if dont_fragment:
            # RFC 8656 §7.2 / §14.8: set DF on packets to peers.
            if family == 4:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, 1)
        return sock

    async def _adopt(self, proto: _RelayProtocol) -> None:
        try:
            transport, _ = await self.loop.create_datagram_endpoint(lambda: proto, sock=proto.sock)
        except (OSError, ValueError) as exc:  # socket closed between bind and adoption
            log.warning("relay socket adoption failed: %s", exc)
            return
        if proto.closed:
            transport.close()

    def release_reservation(self, token: bytes) -> None:
        res = self._reservations.pop(token, None)
        if res is not None:
            res.sock.close()
            self.release_port(res.family, res.port)

    def remove_allocation(self, alloc_id: int) -> AllocationCounters:
        proto = self._relays.pop(alloc_id, None)
        key = self._client_of.pop(alloc_id, None)
        self._detach_buckets(alloc_id)
        if proto is None:
            return AllocationCounters()
        for ch in list(proto.routes):
            self.routes.pop((key, ch.to_bytes(2, "big")), None)
        c = self._counters_of(proto)
        proto.closed = True
        if proto.shared is not None:
            proto.shared.mux.remove(proto, proto.perms)
            proto.shared.members.discard(proto)
        else:
            if proto.transport is not None:
                proto.transport.close()
            else:
                proto.sock.close()
            self.release_port(proto.family, proto.port)
        e = self._ended
        e.pkts_to_peer += c.pkts_to_peer
        e.bytes_to_peer += c.bytes_to_peer
        e.pkts_to_client += c.pkts_to_client
        e.bytes_to_client += c.bytes_to_client
        e.dropped += c.dropped
        e.dropped_bandwidth += c.dropped_bandwidth
        return c

    # -- tables -------------------------------------------------------------------------------

    def add_permission(self, alloc_id: int, peer_ip: str) -> None:
        proto = self._relays[alloc_id]
        proto.perms.add(peer_ip)
        if proto.shared is not None:
            proto.shared.mux.add_permission(proto, peer_ip)
        for channel, route in proto.routes.items():
            if route.peer[0] == peer_ip:  # a channel suspended when the permission lapsed
                self._route_live(proto, channel, route)

    def remove_permission(self, alloc_id: int, peer_ip: str) -> None:
        proto = self._relays.get(alloc_id)
        if proto is not None:
            proto.perms.discard(peer_ip)
            if proto.shared is not None:
                proto.shared.mux.remove_permission(proto, peer_ip)
            # RFC 8656 §9, §12: no relaying either way without a permission, even on a bound
            # channel. The channel stays bound (proto.routes) until its own expiry; only its
            # hot-path entries go, so the per-packet lookups need no permission check.
            key = self._client_of[alloc_id]
            for channel, route in proto.routes.items():
                if route.peer[0] == peer_ip:
                    proto.channels.pop(route.peer, None)
                    self.routes.pop((key, channel.to_bytes(2, "big")), None)

    def _route_live(self, proto: _RelayProtocol, channel: int, route: _Route) -> None:
        """Put a bound channel in both hot-path tables (its peer IP has a permission)."""
        proto.channels[route.peer] = channel
        self.routes[(self._client_of[proto.alloc_id], channel.to_bytes(2, "big"))] = route

    def add_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        proto = self._relays[alloc_id]
        if proto.shared is not None and (why := proto.shared.mux.claim(proto, peer, CHANNEL)):
            raise PeerTaken(_taken(peer, proto.shared.addr, why))
        old = proto.routes.get(channel)
        route = _Route(proto, peer)
        if old is not None:  # refresh: keep the counters
            route.pkts, route.bytes = old.pkts, old.bytes
        proto.routes[channel] = route
        if peer[0] in proto.perms:  # else suspended until add_permission (§9)
            self._route_live(proto, channel, route)

    def remove_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        proto = self._relays.get(alloc_id)
        if proto is None:
            return
        proto.channels.pop(peer, None)
        if proto.shared is not None:
            proto.shared.mux.release(proto, peer, CHANNEL)
        route = proto.routes.pop(channel, None)
        if route is not None:  # keep its traffic in the allocation's totals
            proto.pkts_to_peer += route.pkts
            proto.bytes_to_peer += route.bytes
        self.routes.pop((self._client_of[alloc_id], channel.to_bytes(2, "big")), None)

    # -- forwarding ---------------------------------------------------------------------------

    def send_to_peer(self, alloc_id: int, peer: tuple[str, int], payload: bytes) -> None:
        proto = self._relays.get(alloc_id)
        if proto is None:
            return
        if proto.shared is not None and proto.shared.mux.claim(proto, peer, SEND):
            proto.shared.mux.conflicts += 1  # another allocation's peer: dropped (§10.2)
            return
        if proto.limited and not proto.admit(len(payload), TO_PEER):
            return
        proto.sendto(payload, peer)
        proto.pkts_to_peer += 1
        proto.bytes_to_peer += len(payload)

    def client_channel_data(self, client_key: Hashable, data: bytes) -> bool:
        # RFC 8656 §12.6: channel number in the first 2 bytes, length in the next 2; anything
        # after the length (padding over TCP, or junk) is not relayed.
        route = self.routes.get((client_key, data[:2]))
        if route is None:
            return False
        n = data[2] << 8 | data[3]
        if n + 4 > len(data):
            return False  # §12.4: shorter than its length field: discard
        relay = route.relay
        if relay.limited and not relay.admit(n, TO_PEER):
            return True  # over a bandwidth cap: dropped (and counted)
        route.send(data[4 : 4 + n], route.peer)
        route.pkts += 1
        route.bytes += n
        return True

    # -- accounting ---------------------------------------------------------------------------

    @staticmethod
    def _counters_of(proto: _RelayProtocol) -> AllocationCounters:
        out = AllocationCounters(
            proto.pkts_to_peer,
            proto.bytes_to_peer,
            proto.pkts_to_client,
            proto.bytes_to_client,
            proto.dropped,
            proto.dropped_bw,
        )
        for r in proto.routes.values():
            out.pkts_to_peer += r.pkts
            out.bytes_to_peer += r.bytes
        return out

    def counters(self, alloc_id: int) -> AllocationCounters:
        proto = self._relays.get(alloc_id)
        return self._counters_of(proto) if proto is not None else AllocationCounters()

    def totals(self) -> AllocationCounters:
        t = AllocationCounters(
            self._ended.pkts_to_peer,
            self._ended.bytes_to_peer,
            self._ended.pkts_to_client,
            self._ended.bytes_to_client,
            self._ended.dropped,
            self._ended.dropped_bandwidth,
        )
        for proto in self._relays.values():
            c = self._counters_of(proto)
            t.pkts_to_peer += c.pkts_to_peer
            t.bytes_to_peer += c.bytes_to_peer
            t.pkts_to_client += c.pkts_to_client
            t.bytes_to_client += c.bytes_to_client
            t.dropped += c.dropped
            t.dropped_bandwidth += c.dropped_bandwidth
        return t

    def close(self) -> None:
        for alloc_id in list(self._relays):
            self.remove_allocation(alloc_id)
        for token in list(self._reservations):
            self.release_reservation(token)
        for task in list(self._tasks):
            task.cancel()
        for relays in self._shared.values():
            for relay in relays:
                if relay.transport is not None:
                    relay.transport.close()
                else:
                    relay.sock.close()
        self._shared.clear()
