"""Drive the exchange core (confedge.proxy.exchange) with no event loop and no sockets."""

from __future__ import annotations

from typing import Any

from confedge.proxy import exchange as X
from confedge.proxy.balancer import Balancer
from confedge.proxy.exchange import Exchange, ExchangeSettings
from confedge.proxy.request import Request

NETLOCS = ["10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443"]


def settings(nodes: int = 3, **kw: Any) -> ExchangeSettings:
    up = [True] * nodes
    bal = Balancer(NETLOCS[:nodes], up, "round-robin", [True] * nodes)
    return ExchangeSettings(nodes=bal, netlocs=NETLOCS[:nodes], fqdn=b"edge.example", **kw)


def request(
    method: bytes = b"GET",
    target: str = "/webapp/home",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
    version: str = "1.1",
) -> Request:
    req = Request()
    req.method = method
    req.url = target.encode()
    req.target = target
    req.version = version
    req.host = b"edge.example"
    for name, value in headers or []:
        req.headers.append((name.lower(), name, value))
        if name.lower() == b"upgrade":
            req.websocket = value.lower() == b"websocket"
        if name.lower() == b"connection":
            req.conn_tokens = value.lower()
    req.headers.insert(0, (b"host", b"Host", b"edge.example"))
    if body is not None:
        req.content_length = str(len(body)).encode()
    else:
        req.complete = True
    return req


def start(req: Request, st: ExchangeSettings | None = None, now: float = 0.0) -> Exchange:
    ex = Exchange(st or settings(), req, client_ip="192.0.2.7", peer="192.0.2.7", now=now)
    ex.start(now, buffer_body=not req.complete)
    return ex


def take(ex: Exchange) -> tuple[list[bytes], list[bytes], list[tuple[int, Any]]]:
    """What the core queued since the last call (as an adapter would flush it)."""
    out = (list(ex.to_client), list(ex.to_node), ex.actions)
    ex.to_client.clear()
    ex.to_node.clear()
    ex.actions = []
    return out


def kinds(actions: list[tuple[int, Any]]) -> list[int]:
    return [k for k, _ in actions]


def connect(ex: Exchange, now: float = 0.0) -> tuple[int, bytes]:
    """Answer the pending A_CONNECT; returns (node index, bytes the node got)."""
    _, _, actions = take(ex)
    conns = [a for k, a in actions if k == X.A_CONNECT]
    assert conns, actions
    i = conns[-1][0]
    ex.node_connected(now)
    _, to_node, _ = take(ex)
    return i, b"".join(to_node)
