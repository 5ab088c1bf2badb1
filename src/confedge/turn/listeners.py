"""Thin asyncio adapters between the TURN port (UDP and TCP) and the sans-I/O core.

The only per-packet work here is the first-byte test: ChannelData (0x40-0x7F, RFC 8656 §12,
RFC 7983) goes straight to the data plane's table lookup without any STUN parsing; everything
else is a STUN message for :meth:`TurnCore.handle`.

TCP (RFC 8656 §3.1, RFC 8489 §6.2.2): frames are cut from the stream by
:class:`confedge.stun.StreamFramer`; each connection is its own 5-tuple, so an allocation made
over it ends when it closes ("tcp-closed").  The relayed leg stays UDP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from confedge.stun import StunError

from .core import Client, TurnCore
from .dataplane import ClientSink, DataPlane
from .framing import TurnStreamFramer
from .portshare import ProxyHeaderError, decode_proxy_v2

__all__ = ["RelayedConnection", "TcpConnection", "UdpListener"]

log = logging.getLogger("confedge.turn")

# A TCP connection that has not allocated within this many seconds is closed (a cheap defence
# against idle connection floods and slowloris-style partial frames; a real client allocates
# within a second).  The check repeats at this interval, so a connection whose allocation ended
# (expired, refreshed to 0) does not hold a connection slot for ever either.
TCP_SETUP_TIMEOUT = 30.0


class UdpListener(asyncio.DatagramProtocol):
    """The UDP TURN/STUN port."""

    def __init__(
        self, core: TurnCore, dataplane: DataPlane, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.core = core
        self._channel_data = dataplane.client_channel_data
        # The pure-Python data plane exposes its route table so that the ChannelData hot path
        # below is one dict lookup without an extra Python call (same logic as
        # UdpDataPlane.client_channel_data); other back ends go through the method.
        routes = getattr(dataplane, "routes", None)
        self._routes: dict[Any, Any] | None = routes if isinstance(routes, dict) else None
        self._time = loop.time
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for clients that went away; nothing to do

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:  # ChannelData, see framing.py
            routes = self._routes
            if routes is None:
                self._channel_data(addr, data)
                return
            route = routes.get((addr, data[:2]))
            if route is not None:  # unknown channel: dropped (RFC 8656 §12.4)
                n = data[2] << 8 | data[3]
                if n + 4 <= len(data):  # shorter than its length field: dropped
                    relay = route.relay
                    if relay.limited and not relay.admit(n, 0):  # over a cap (bandwidth.py)
                        return
                    route.send(data[4 : 4 + n], route.peer)
                    route.pkts += 1
                    route.bytes += n
            return
        transport = self.transport
        assert transport is not None
        client = Client(addr, addr[0], addr[1], "udp", ClientSink(transport, addr))
        for out in self.core.handle(self._time(), client, data):
            transport.sendto(out, addr)


class TcpConnection(asyncio.Protocol):
    """One TCP client connection on the TURN port."""

    # Relayed media is loss-tolerant: rather than buffering without bound for a client that does
    # not read, drop relayed packets while this much is queued (see _RelayProtocol).
    WRITE_HIGH_WATER = 256 * 1024

    def __init__(
        self,
        core: TurnCore,
        dataplane: DataPlane,
        loop: asyncio.AbstractEventLoop,
        connections: set[TcpConnection],
        max_connections: int = 1 << 30,
        kind: str = "tcp",
    ) -> None:
        self.kind = kind  # "tcp", or "tls" for TURN over TLS (RFC 8656 §3.1; same framing)
        self.core = core
        self._max_connections = max_connections
        self._channel_data = dataplane.client_channel_data
        self._loop = loop
        self._connections = connections
        # ChannelData is refused until the connection has an allocation (see TurnStreamFramer).
        self._framer = TurnStreamFramer(channel_ok=False)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self._setup_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its interface.
        transport = cast(asyncio.Transport, transport)
        self.attach(transport, transport.get_extra_info("peername"))

    def attach(self, transport: asyncio.Transport, peer: tuple[Any, ...]) -> None:
        """Serve `transport` as the connection of the client at `peer`.

        Called by connection_made with the socket's peer, and for connections accepted
        elsewhere (turn.tls_on_https, portshare.py) with the client's real address: a
        connection relayed from a proxy worker has the worker as its socket peer.
        """
        if len(self._connections) >= self._max_connections:
            transport.abort()  # over the cap: refuse before any per-connection state
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self.WRITE_HIGH_WATER)
        key = (self.kind, peer[0], peer[1])
        self.client = Client(key, peer[0], peer[1], self.kind, ClientSink(transport, None))
        self._connections.add(self)
        self._setup_timer = self._loop.call_later(TCP_SETUP_TIMEOUT, self._setup_expired)

    def _setup_expired(self) -> None:
        client, transport = self.client, self.transport
        if client is None or transport is None or transport.is_closing():
            return
        if self.core.has_allocation(client.key):
            self._setup_timer = self._loop.call_later(TCP_SETUP_TIMEOUT, self._setup_expired)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        client = self.client
        if transport is None or client is None:
            return  # refused in connection_made
        try:
            frames = self._framer.feed(data)
        except StunError:
            transport.close()  # not TURN: RFC 8489 §6.2.2 framing lost
            return
        for frame in frames:
            if 0x40 <= frame[0] <= 0x7F:
                self._channel_data(client.key, frame)
                continue
            for out in self.core.handle(self._loop.time(), client, frame):
                transport.write(out)
            if not self._framer.channel_ok and self.core.has_allocation(client.key):
                self._framer.channel_ok = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._setup_timer is not None:
            self._setup_timer.cancel()
        if self.client is not None:
            self.core.client_gone(self._loop.time(), self.client.key, "tcp-closed")


# A relayed connection must name its client within this many seconds (the worker sends the
# header with its first write, so this only bounds a stuck or foreign local client).
RELAY_HEADER_TIMEOUT = 5.0


def _same_user(transport: asyncio.BaseTransport) -> bool:
    """True when the peer of a Unix stream runs as this process's user (SO_PEERCRED).

    The relay socket's directory is already private (mode 0700); this is the second lock on a
    door that lets the other side name any client address it likes.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


class RelayedConnection(asyncio.Protocol):
    """A TURN-over-TLS client relayed from a proxy worker process (turn.tls_on_https).

    The worker terminated TLS on the HTTPS port and opened this local stream for one client; it
    starts with a PROXY protocol v2 header naming the client (portshare.py). Once the header is
    read the stream becomes a :class:`TcpConnection` of that client, so its allocation's
    5-tuple, the 401 budget and the guard see the client's address, never the worker's.
    """

    def __init__(self, make: Callable[[], TcpConnection], loop: asyncio.AbstractEventLoop) -> None:
        self._make = make
        self._loop = loop
        self._buf = b""
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        if not _same_user(transport):
            log.warning("turn: refused a relay connection from another user")
            transport.abort()
            return
        self.transport = transport
        self._timer = self._loop.call_later(RELAY_HEADER_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self._buf += data
        try:
            got = decode_proxy_v2(self._buf)  # bounded: a header is at most 232 bytes
        except ProxyHeaderError as exc:
            log.warning("turn: relay connection without a valid client header: %s", exc)
            transport.abort()
            return
        if got is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        peer, used = got
        rest, self._buf, self.transport = self._buf[used:], b"", None
        if peer is None:  # LOCAL: a probe with no client behind it
            transport.close()
            return
        conn = self._make()
        transport.set_protocol(conn)
        conn.attach(transport, peer)
        if rest and conn.transport is not None:
            conn.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
