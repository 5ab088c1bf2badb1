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


def test_unrequested_101_is_an_invalid_response() -> None:
    """RFC 9110 §15.2.2: no Upgrade asked, so a 101 is invalid: the connection is closed and
    the request fails over (or gets the 502 page), as for a response that cannot be parsed;
    it used to cut the client with no answer at all."""
    ex = start(request())
    connect(ex)
    ex.response_head(101, [], 1.0)
    to_client, _, actions = take(ex)
    assert to_client == [] and actions[0] == (X.A_NODE_DONE, False)
    assert actions[1][0] == X.A_MARK_FAILED and "101 without an upgrade" in actions[1][1][1]
    assert actions[2][0] == X.A_CONNECT and ex.state == State.CONNECTING
    # the parser's upgrade stop that follows is about the connection already left
    ex.node_upgraded(b"hello", 1.0)
    assert take(ex) == ([], [], []) and ex.state == State.CONNECTING
