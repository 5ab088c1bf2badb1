"""Helpers for tests and benchmarks that need a TURN server on loopback.

Like trio's testing package: small, typed, and used by the project's own tests, so that bench and
browser tests start the relay exactly the way the test suite does.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Hashable, Sequence
from typing import Any

from confedge.config import Config, parse_config
from confedge.stun import (
    Attr,
    Message,
    MessageBuilder,
    Method,
    MsgClass,
    StunError,
    decode_error_code,
    encode_requested_address_family,
    encode_requested_transport,
    encode_xor_address,
    long_term_key,
    new_transaction_id,
    parse_message,
)

from .dataplane import AllocationCounters, CapacityError, ClientSink, DataPlane, RelayGrant

__all__ = ["MemoryDataPlane", "UdpTurnClient", "response_code", "shared_port_config", "turn_config"]


def turn_config(
    *,
    mode: str = "restricted",
    host: str = "127.0.0.1",
    port: int = 0,
    relay_ports: str = "21000-24999",
    allowed_peers: list[str] | None = None,
    media_nodes: list[str] | None = None,
    username: str = "turnuser",
    password: str = "turnpass",  # noqa: S107 - test credential
    secrets: list[str] | None = None,
    domain: str = "example.test",
    state_dir: str = "/tmp",
    sections: dict[str, dict[str, Any]] | None = None,
    **turn: Any,
) -> Config:
    """A Config with only TURN enabled on loopback (proxy off).

    Defaults: restricted mode, 127.0.0.0/8 safelisted as media nodes, 127.0.0.1 allowed as a
    peer (as coturn's --allow-loopback-peers), relay ports in the TURN tests' range.
    """
    section: dict[str, Any] = {
        "enabled": True,
        "mode": mode,
        "port": port,
        "relay_ports": relay_ports,
        "allowed_peers": ["127.0.0.1"] if allowed_peers is None else allowed_peers,
        "media_nodes": ["127.0.0.0/8"] if media_nodes is None else media_nodes,
        **turn,
    }
    if mode == "restricted":
        section["username"] = username
        section["password"] = password
    else:
        section["secrets"] = secrets or ["s3cret-current", "s3cret-previous"]
    data: dict[str, Any] = {
        "server": {"domain": domain, "internal_address": host, "state_dir": state_dir},
        "proxy": {"enabled": False},
        "turn": section,
    }
    data.update(sections or {})  # other sections, e.g. {"guard": {...}}
    # TURN over TLS is off unless a test asks for it: the configuration's default (5349) is a
    # fixed port, which parallel tests (and a running confedge) would collide on.
    section.setdefault("tls_port", 0)
    return parse_config(data)


def shared_port_config(
    state_dir: str,
    nodes: list[str],
    *,
    workers: int = 1,
    relay_ports: str,
    on: bool = True,
    host: str = "127.0.0.1",
) -> Config:
    """TURN and the proxy on loopback, TURN over TLS sharing the HTTPS port (turn.tls_on_https),
    every port ephemeral, management off: what the shared-port tests start with Runtime."""
    return turn_config(
        host=host,
        tls_on_https=on,
        relay_ports=relay_ports,
        state_dir=state_dir,
        sections={
            "proxy": {
                "https_port": 0,
                "http_port": 0,
                "workers": workers,
                "nodes": nodes,
                "access_log": f"{state_dir}/access.log",
                "health_interval": 0.2,
                "health_timeout": 0.5,
            },
            "management": {"enabled": False},
        },
    )


class MemoryDataPlane(DataPlane):
    """In-memory :class:`DataPlane` for sans-I/O tests: records what the core asked for.

    Relay ports are handed out sequentially from ``first_port``; ``capacity`` bounds how many
    relays may exist at once (to provoke 508).
    """

    def __init__(
        self, *, first_port: int = 50000, capacity: int = 1 << 30, v6: bool = False
    ) -> None:
        self.next_port = first_port
        self.capacity = capacity
        self.v6 = v6
        self.allocations: dict[int, dict[str, Any]] = {}
        self.reservations: dict[bytes, int] = {}
        self.sent: list[tuple[int, tuple[str, int], bytes]] = []
        self.released: list[bytes] = []
        self._ended = AllocationCounters()
        self.bandwidth = (0, 0, 0)
        # Traffic a test pretends was relayed, per allocation (counters() and totals() read it).
        self.traffic: dict[int, AllocationCounters] = {}

    def families(self) -> frozenset[int]:
        return frozenset({4, 6}) if self.v6 else frozenset({4})

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
        if len(self.allocations) >= self.capacity:
            raise CapacityError("memory data plane full")
        if use_token is not None:
            if use_token not in self.reservations:
                raise CapacityError("unknown token")
            port = self.reservations.pop(use_token)
        else:
            port = self.next_port
            if even_port and port % 2:
                port += 1
            self.next_port = port + (2 if reserve_token is not None else 1)
            if reserve_token is not None:
                self.reservations[reserve_token] = port + 1
        ip = "203.0.113.5" if family == 4 else "2001:db8::5"
        self.allocations[alloc_id] = {
            "family": family,
            "client": client_key,
            "port": port,
            "dont_fragment": dont_fragment,
            "user": user,
            "rate": None,
            "perms": set(),
            "channels": {},
        }
        return RelayGrant(family, ip, port)

    def release_reservation(self, token: bytes) -> None:
        self.released.append(token)
        self.reservations.pop(token, None)

    def set_bandwidth(self, per_allocation: int, per_user: int, total: int) -> None:
        self.bandwidth = (per_allocation, per_user, total)

    def set_allocation_rate(self, alloc_id: int, rate: int) -> None:
        if alloc_id in self.allocations:
            self.allocations[alloc_id]["rate"] = rate

    def remove_allocation(self, alloc_id: int) -> AllocationCounters:
        self.allocations.pop(alloc_id, None)
        return AllocationCounters()

    def add_permission(self, alloc_id: int, peer_ip: str) -> None:
        self.allocations[alloc_id]["perms"].add(peer_ip)

    def remove_permission(self, alloc_id: int, peer_ip: str) -> None:
        self.allocations[alloc_id]["perms"].discard(peer_ip)

    def add_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        self.allocations[alloc_id]["channels"][channel] = peer

    def remove_channel(self, alloc_id: int, channel: int, peer: tuple[str, int]) -> None:
        self.allocations[alloc_id]["channels"].pop(channel, None)

    def send_to_peer(self, alloc_id: int, peer: tuple[str, int], payload: bytes) -> None:
        self.sent.append((alloc_id, peer, payload))

    def client_channel_data(self, client_key: Hashable, data: bytes) -> bool:
        return False

    def counters(self, alloc_id: int) -> AllocationCounters:
        return self.traffic.get(alloc_id, AllocationCounters())

    def totals(self) -> AllocationCounters:
        t = AllocationCounters(pkts_to_peer=len(self.sent))
        for c in self.traffic.values():
            t.bytes_to_peer += c.bytes_to_peer
            t.bytes_to_client += c.bytes_to_client
        return t

    def close(self) -> None:
        self.allocations.clear()


def response_code(msg: Message) -> int:
    """200 for a success response, else the ERROR-CODE number."""
    if msg.msg_class == MsgClass.SUCCESS:
        return 200
    raw = msg.get(Attr.ERROR_CODE)
    return decode_error_code(raw)[0] if raw is not None else 0


class UdpTurnClient:
    """A minimal TURN client over a real UDP socket (RFC 8656 §7-§9, RFC 8489 §9.2).

    It does what a client does on the wire and nothing more: an unauthenticated first request,
    then the REALM and NONCE of the 401/438 with MESSAGE-INTEGRITY; answers whose transaction
    ID it did not send are ignored (a spoofed-source test sends the socket answers to
    datagrams it never sent).  ``local`` picks the source address and port, so a test can be a
    given media node.
    """

    def __init__(
        self,
        server: tuple[str, int],
        username: str,
        password: str,
        realm: str,
        *,
        local: tuple[str, int] = ("127.0.0.1", 0),
        timeout: float = 1.0,
        retries: int = 3,
    ) -> None:
        self.server = server
        self.username = username
        self.realm = realm
        self.key = long_term_key(username, realm, password)
        self.nonce: bytes | None = None
        self.timeout = timeout
        self.retries = retries
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(local)
        self.sock.connect(server)
        self.local: tuple[str, int] = self.sock.getsockname()[:2]

    def close(self) -> None:
        self.sock.close()

    def build(
        self, method: int, attrs: Sequence[tuple[int, bytes]], tid: bytes, auth: bool
    ) -> bytes:
        b = MessageBuilder(method, MsgClass.REQUEST, tid)
        for a, v in attrs:
            b.add(a, v)
        if auth and self.nonce is not None:
            b.add(Attr.USERNAME, self.username.encode())
            b.add(Attr.REALM, self.realm.encode())
            b.add(Attr.NONCE, self.nonce)
            return b.build(key=self.key, fingerprint=True)
        return b.build(fingerprint=True)

    async def transact(self, wire: bytes, tid: bytes) -> Message | None:
        """Send ``wire`` (retransmitted ``retries`` times); the answer, or None when none came."""
        loop = asyncio.get_running_loop()
        for _ in range(self.retries):
            self.sock.send(wire)
            deadline = loop.time() + self.timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), left)
                except TimeoutError:
                    break
                except ConnectionRefusedError:
                    continue  # ICMP for an earlier datagram
                try:
                    msg = parse_message(data)
                except StunError:
                    continue
                if msg.transaction_id == tid:
                    return msg
        return None

    async def request(
        self, method: int, attrs: Sequence[tuple[int, bytes]] = (), *, auth: bool = True
    ) -> Message | None:
        """One request; on 401/438 learn the NONCE and retry once, as real clients do."""
        tid = new_transaction_id()
        msg = await self.transact(self.build(method, attrs, tid, auth), tid)
        if msg is not None and auth and response_code(msg) in (401, 438):
            nonce = msg.get(Attr.NONCE)
            if nonce is None:
                return msg
            self.nonce = nonce
            tid = new_transaction_id()
            msg = await self.transact(self.build(method, attrs, tid, auth), tid)
        return msg

    async def allocate(self, family: int = 4) -> Message | None:
        attrs: list[tuple[int, bytes]] = [
            (Attr.REQUESTED_TRANSPORT, encode_requested_transport(17))
        ]
        if family == 6:
            attrs.append((Attr.REQUESTED_ADDRESS_FAMILY, encode_requested_address_family(2)))
        return await self.request(Method.ALLOCATE, attrs)

    async def create_permission(self, peer: str) -> int:
        """CreatePermission for ``peer``; the response code (0 when nothing came back).

        The XOR-PEER-ADDRESS is computed with the transaction ID, so the request is built here
        rather than by :meth:`request` (a retry after 438 needs a new ID, hence a new value)."""
        for _ in range(2):
            tid = new_transaction_id()
            attrs = [(Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, 9, tid))]
            msg = await self.transact(self.build(Method.CREATE_PERMISSION, attrs, tid, True), tid)
            if msg is None:
                return 0
            code = response_code(msg)
            if code in (401, 438) and msg.get(Attr.NONCE) is not None:
                self.nonce = msg.get(Attr.NONCE)
                continue
            return code
        return code
