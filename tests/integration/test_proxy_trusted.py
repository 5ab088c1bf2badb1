"""Behind a trusted load balancer: the client address comes from X-Forwarded-For, whatever
spelling the balancer uses ("ip:port", "[v6]:port", ::ffff: forms), so PIN failures are counted
against the client and never against the balancer (which would ban everyone behind it)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from guard_upstream import PinNode

from confedge.config import Config, parse_config
from confedge.guard import create_guard
from confedge.proxy.service import ProxyService

TOKEN = "/api/client/v2/conferences/meet/request_token"


def _ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def post(port: int, pin: str, xff: str | None, source: str = "127.0.0.1") -> int:
    """One POST to request_token from `source` (the "load balancer"); the answer's status."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=_ssl(), local_addr=(source, 0)
    )
    try:
        x = f"X-Forwarded-For: {xff}\r\n" if xff is not None else ""
        writer.write(
            f"POST {TOKEN} HTTP/1.1\r\nHost: localhost\r\npin: {pin}\r\n{x}"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), 10)
        await reader.read()
        return int(line.split()[1])
    finally:
        writer.close()


def config(node: PinNode, state: Path, **proxy: Any) -> Config:
    p: dict[str, Any] = {
        "https_port": 0,
        "http_port": 0,
        "workers": 1,
        "nodes": [node.address],
        "access_log": str(state / "access.log"),
        "health_interval": 30,
        "trusted_proxies": ["127.0.0.0/24"],
    }
    p.update(proxy)
    return parse_config(
        {
            "server": {"state_dir": str(state)},
            "turn": {"enabled": False},
            "proxy": p,
            "guard": {
                "enabled": True,
                "maxretry": 3,
                "findtime": 60,
                "bantime": 60,
                "jitter": 0.0,
                "escalation": 1.0,
                "ignore": [],
                "conference_maxretry": 1000,
                "store": "memory",
            },
        }
    )


@pytest.fixture
async def node() -> Any:
    n = await PinNode().start()
    yield n
    await n.stop()


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ("203.0.113.9:5555", "203.0.113.9"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("10.9.9.9, 198.51.100.8:40000", "198.51.100.8"),  # the rightmost untrusted hop
    ],
)
async def test_guesser_behind_balancer_is_banned_not_the_balancer(
    node: PinNode, tmp_path: Path, xff: str, client: str
) -> None:
    svc = ProxyService(config(node, tmp_path), guard_factory=create_guard)
    await svc.start()
    try:
        port = svc.https_port
        for guess in ("0000", "0001", "0002"):
            assert await post(port, guess, xff) == 403
        # The node saw the client's address, normalised, as X-Real-IP.
        assert node.attempts_from(client) == 3
        assert node.attempts_from("127.0.0.1") == 0
        assert await post(port, "1234", xff) == 429  # the guesser is banned ...
        # ... while another participant behind the same balancer still joins,
        assert await post(port, "1234", "203.0.113.77:1234") == 200
        assert node.attempts_from("203.0.113.77") == 1
        # and so does a request straight from the balancer's address.
        assert await post(port, "1234", None) == 200
    finally:
        await svc.close()


async def test_xff_from_an_untrusted_peer_is_ignored(node: PinNode, tmp_path: Path) -> None:
    svc = ProxyService(
        config(node, tmp_path, trusted_proxies=["127.0.0.2/32"]), guard_factory=create_guard
    )
    await svc.start()
    try:
        port = svc.https_port
        for guess in ("0000", "0001", "0002"):
            assert await post(port, guess, "203.0.113.9:5555", source="127.0.0.1") == 403
        # 127.0.0.1 is not a trusted proxy: its X-Forwarded-For is the client's own claim.
        assert node.attempts_from("127.0.0.1") == 3
        assert await post(port, "1234", "203.0.113.10", source="127.0.0.1") == 429
        # Through the trusted balancer, 203.0.113.9 was never counted.
        assert await post(port, "1234", "203.0.113.9:5555", source="127.0.0.2") == 200
    finally:
        await svc.close()
