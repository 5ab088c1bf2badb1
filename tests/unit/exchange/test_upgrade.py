"""WebSocket upgrade (RFC 6455 §4, RFC 9110 §7.8): 101 relayed, then a tunnel."""

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import connect, request, start, take

WS = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


def test_101_then_tunnel() -> None:
    ex = start(request(headers=WS))
    assert ex.client_upgrade()
    _, head = connect(ex)
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in head
    ex.response_head(101, [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"x")], 1.0)
    to_client, _, _ = take(ex)
    assert to_client[0].startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Accept: x" in to_client[0]
    ex.node_upgraded(b"\x81\x00", 1.0)
    to_client, _, actions = take(ex)
    assert to_client == [b"\x81\x00"] and (X.A_TUNNEL, None) in actions
    assert ex.state == State.TUNNEL
    ex.node_lost(5.0)
    _, _, actions = take(ex)
    assert actions == [(X.A_CLOSE_CLIENT, None)]


def test_declined_upgrade_closes_after_response() -> None:
    ex = start(request(headers=WS))
    ex.client_upgrade()
    connect(ex)
    ex.response_head(200, [(b"Content-Length", b"0")], 1.0)
    ex.response_end(True, 1.0)
    to_client, _, actions = take(ex)
    assert b"Connection: close" in to_client[0]
    assert (X.A_NO_TUNNEL, None) in actions and actions[-1] == (X.A_FINISH, True)


def test_unrequested_101_aborts() -> None:
    ex = start(request())
    connect(ex)
    ex.response_head(101, [], 1.0)
    _, _, actions = take(ex)
    assert (X.A_ABORT_CLIENT, None) in actions and ex.state == State.DONE
