"""A UDP client socket for raw STUN exchanges with a TURN server under test (the hostile and
authentication QA suites): send bytes, read what came back, without blocking the loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from confedge.stun import Message, parse_message

ATTACKER = "127.0.0.2"  # the QA suites' default source address (a loopback alias)


class StunUdp:
    """One non-blocking UDP socket bound to `source`, talking to `server`."""

    def __init__(self, server: tuple[str, int], source: str = ATTACKER) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.setblocking(False)
        self.server = server

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError):
            self.sock.sendto(data, self.server)

    def drain(self) -> list[bytes]:
        """Every datagram waiting now (read and returned: earlier answers out of the way)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(65535))
            except BlockingIOError:
                return out

    async def request(self, data: bytes, timeout: float = 2.0) -> bytes:
        """The last datagram of the first read that finds any after sending `data`; raises
        TimeoutError when none comes."""
        self.drain()
        self.send(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.drain()
            if got:
                return got[-1]
            await asyncio.sleep(0.005)
        raise TimeoutError("no answer")

    async def ask(self, wire: bytes, timeout: float = 0.5) -> Message | None:
        """The answer to `wire`, parsed, or None when the server stays silent."""
        self.drain()
        self.sock.sendto(wire, self.server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return parse_message(self.sock.recv(65535))
            except BlockingIOError:
                await asyncio.sleep(0.005)
        return None

    def close(self) -> None:
        self.sock.close()
