"""TURN over TLS on the HTTPS port (turn.tls_on_https): handing a connection to TURN.

`ClientConnection` (server.py) decides, once per connection, whether a TLS connection on the
HTTPS port is TURN (ALPN ``stun.turn``, or STUN/ChannelData as its first bytes:
confedge.turn.portshare). It then calls ``core.turn_share.take(transport, first_bytes)`` with
one of these:

* :class:`InProcessShare` (proxy.workers = 1, the TURN service in the same event loop): the TLS
  transport is given to a TURN stream protocol as it is; no copy, no extra hop.
* :class:`RelayShare` (proxy.workers > 1, TURN in the main process): the worker keeps the TLS
  session and relays the plaintext over a local Unix stream, which starts with a PROXY
  protocol v2 header naming the client. Why not pass the socket itself (SCM_RIGHTS): the TLS
  session state cannot follow it, and before the handshake only ALPN could route, which
  browsers do not send (docs/TURN.md). Media on TURN over TLS is a fallback path; one local
  copy per packet is cheap next to the TLS record work it already needs.

Flow control across the relay: a full client write buffer pauses reading the local stream,
whose kernel buffer then fills, so TURN's own write buffer for the client grows past its high
water mark and TURN drops relayed media (it is loss-tolerant) instead of queueing it; the other
way, a full local stream pauses reading from the client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confedge.turn.portshare import ALPN_STUN_TURN, encode_proxy_v2

__all__ = ["InProcessShare", "RelayShare", "alpn_selects_turn"]

log = logging.getLogger("confedge.proxy")

# Connecting to the TURN service's local socket: it is on this host, so this is long.
RELAY_CONNECT_TIMEOUT = 5.0


def alpn_selects_turn(transport: Any) -> bool:
    """True when the TLS handshake selected ALPN "stun.turn" (RFC 7443 §4)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_STUN_TURN


class InProcessShare:
    """Hands connections to a TurnService running in this process."""

    def __init__(self, turn: Any) -> None:
        self.turn = turn

    def take(self, transport: asyncio.Transport, first: bytes) -> None:
        proto = self.turn.stream_protocol("tls-https")
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if first and not transport.is_closing():
            proto.data_received(first)

    async def close(self) -> None:
        """Nothing to do: the TURN service owns (and closes) what it was handed."""


class _ClientSide(asyncio.Protocol):
    """The client's TLS transport, once it is TURN: its bytes go to the local stream."""

    def __init__(self, share: RelayShare, transport: asyncio.Transport, first: bytes) -> None:
        self.share = share
        self.client = transport
        self.local: asyncio.Transport | None = None
        self.pending: list[bytes] = [first]  # until the local stream is connected
        self.closed = False

    def data_received(self, data: bytes) -> None:
        if self.local is not None:
            self.local.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        return False  # TURN framing has no half-close: the connection ends

    def pause_writing(self) -> None:
        if self.local is not None:
            self.local.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None:
            self.local.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.share.relays.discard(self)
        if self.local is not None:
            self.local.close()

    def connected(self, local: asyncio.Transport) -> None:
        self.local = local
        for chunk in self.pending:
            local.write(chunk)
        self.pending = []
        self.client.resume_reading()

    def abort(self) -> None:
        self.client.abort()
        if self.local is not None:
            self.local.abort()


class _LocalSide(asyncio.Protocol):
    """The local stream to the TURN service: its bytes go to the client."""

    def __init__(self, side: _ClientSide) -> None:
        self.side = side

    def data_received(self, data: bytes) -> None:
        self.side.client.write(data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.side.client.pause_reading()

    def resume_writing(self) -> None:
        self.side.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.client.close()  # TURN ended it (no allocation, shutdown): the client goes


class RelayShare:
    """Relays connections to the TURN service's local socket (TurnService.open_relay_listener)."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.loop = loop
        self.relays: set[_ClientSide] = set()
        self._connecting: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs
        self._failures_logged = 0.0

    def take(self, transport: asyncio.Transport, first: bytes) -> None:
        peer = transport.get_extra_info("peername")
        here = transport.get_extra_info("sockname")
        if not peer or not here:  # the socket is already gone
            transport.abort()
            return
        side = _ClientSide(self, transport, encode_proxy_v2(peer, here) + first)
        transport.set_protocol(side)
        transport.pause_reading()  # until the local stream is there to take the bytes
        self.relays.add(side)
        task = self.loop.create_task(self._connect(side))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, side: _ClientSide) -> None:
        try:
            async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
                local, _ = await self.loop.create_unix_connection(
                    lambda: _LocalSide(side), self.path
                )
        except (OSError, TimeoutError) as exc:
            now = self.loop.time()
            if now - self._failures_logged > 10.0:  # at most one line per 10 s
                self._failures_logged = now
                log.error("turn.tls_on_https: cannot reach TURN at %s: %s", self.path, exc)
            side.abort()
            self.relays.discard(side)
            return
        if side.closed:  # the client left while we connected
            local.close()
            return
        side.connected(local)

    async def close(self) -> None:
        """Cut every relayed connection (the worker is stopping)."""
        for task in list(self._connecting):
            task.cancel()
        for side in list(self.relays):
            side.abort()
        self.relays.clear()
