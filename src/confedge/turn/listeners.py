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
from typing import Any, cast

from confedge.stun import StunError

from .core import Client, TurnCore
from .dataplane import ClientSink, DataPlane
from .framing import TurnStreamFramer

__all__ = ["TcpConnection", "UdpListener"]

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
        if len(self._connections) >= self._max_connections:
            transport.abort()  # over the cap: refuse before any per-connection state
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self.WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
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
