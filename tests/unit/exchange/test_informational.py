"""RFC 9110 §15.2: 1xx responses from a node are not forwarded (the proxy sends its own 100,
server.py, for a client's `Expect: 100-continue`); they commit nothing, so failover and the read
timeout still apply after them. 101 is not informational here: it is the WebSocket upgrade
(test_upgrade.py), relayed at once."""

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import connect, kinds, request, settings, start, take

LINK = (b"Link", b"</app.css>; rel=preload; as=style")


def _informational(ex: X.Exchange, status: int, now: float) -> None:
    """A 1xx as the node adapter reports it: a head and, at once, its end (no body)."""
    ex.response_head(status, [LINK], now)
    ex.response_end(True, now)


def test_103_and_100_are_swallowed_then_200_relayed() -> None:
    ex = start(request())
    connect(ex)
    for status in (100, 103):
        ex.response_head(status, [(b"Link", b"</a.css>; rel=preload")], 0.5)
        ex.response_end(True, 0.5)
        to_client, _, actions = take(ex)
        assert to_client == [] and actions == [] and ex.state == State.WAITING
    ex.response_head(200, [(b"Content-Length", b"1")], 1.0)
    ex.response_body(b"x")
    ex.response_end(True, 1.0)
    to_client, _, _ = take(ex)
    assert b"".join(to_client).startswith(b"HTTP/1.1 200 OK\r\n")
    assert ex.statuses == ["200"]


def test_expect_is_not_forwarded_and_the_nodes_100_is_absorbed() -> None:
    """The proxy answers Expect itself (RFC 9110 §10.1.1): the node never sees it, so a 100
    it sends anyway must not reach the client a second time."""
    req = request(b"POST", "/api/x", headers=[(b"Expect", b"100-continue")], body=b"hello")
    ex = start(req)
    assert ex.state == State.BUFFERING
    ex.request_body(b"hello", 0.1)
    ex.request_end(0.1)
    _, sent = connect(ex, 0.1)
    assert b"expect" not in sent.lower() and sent.endswith(b"\r\n\r\nhello")
    _informational(ex, 100, 0.2)
    assert take(ex) == ([], [], []) and not ex.committed and ex.status == 0
    ex.response_head(201, [(b"Content-Length", b"0")], 0.3)
    ex.response_end(True, 0.3)
    to_client, _, actions = take(ex)
    assert to_client == [b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"]
    assert actions[-1] == (X.A_FINISH, False) and ex.statuses == ["201"]


def test_several_1xx_before_the_final_response() -> None:
    ex = start(request())
    connect(ex)
    for status in (100, 102, 103, 103):
        _informational(ex, status, 0.5)
        assert take(ex) == ([], [], []) and ex.state == State.WAITING
    ex.response_head(204, [(b"X-Final", b"1")], 0.6)
    ex.response_end(True, 0.6)
    to_client, _, actions = take(ex)
    head = b"".join(to_client)
    assert head.startswith(b"HTTP/1.1 204") and b"X-Final: 1" in head
    assert b"Link" not in head  # the hints stayed with their 103s
    assert actions[-1] == (X.A_FINISH, False)
    assert (X.A_NODE_DONE, True) in actions  # the connection is fit for reuse after them
    assert ex.statuses == ["204"] and ex.state == State.DONE


def test_an_early_hint_commits_nothing_failover_still_applies() -> None:
    ex = start(request(), settings(2))
    first, _ = connect(ex)
    _informational(ex, 103, 0.2)
    take(ex)
    ex.response_head(502, [(b"Content-Length", b"0")], 0.3)
    _, _, actions = take(ex)
    second = next(a for k, a in actions if k == X.A_CONNECT)[0]
    assert second != first and ex.state == State.CONNECTING
    ex.node_connected(0.4)
    take(ex)
    ex.response_head(200, [(b"Content-Length", b"0")], 0.5)
    ex.flush_head()  # (the end of the node's read)
    to_client, _, _ = take(ex)
    assert b"".join(to_client).startswith(b"HTTP/1.1 200")
    assert ex.statuses == ["502", "200"]


def test_read_timeout_after_an_early_hint_is_a_504_attempt() -> None:
    ex = start(request(), settings(1, read_timeout=5.0), now=10.0)
    connect(ex, 10.0)
    _informational(ex, 103, 11.0)
    assert take(ex)[2] == []  # a 1xx does not re-arm the node's read timer
    ex.node_timeout(15.0)
    _, _, actions = take(ex)
    assert (X.A_LOCAL, (504, b"", True)) in actions and ex.statuses == ["504"]
    assert (X.A_MARK_FAILED, (0, "no response within proxy.read_timeout", False)) in actions


def test_a_1xx_counts_as_the_nodes_answer_on_a_reused_connection() -> None:
    """A reused keep-alive connection that closes before any byte is replayed on the same node
    without blame; after a 1xx the node did answer, so its loss is the node's failure."""
    ex = start(request(), settings(2))
    take(ex)
    ex.node_connected(0.0, reused=True)
    take(ex)
    _informational(ex, 100, 0.1)
    ex.node_lost(0.2, got_bytes=False)
    _, _, actions = take(ex)
    assert X.A_MARK_FAILED in kinds(actions) and ex.statuses == ["502"]


def test_101_is_not_informational() -> None:
    """A 101 to the client's upgrade is relayed at once and waits for the tunnel: the end of
    its head (httptools' message end) neither finishes the exchange nor is swallowed."""
    ws = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    ex = start(request(headers=ws))
    assert ex.client_upgrade()
    connect(ex)
    ex.response_head(101, [(b"Upgrade", b"websocket")], 1.0)
    ex.response_end(False, 1.0)
    to_client, _, actions = take(ex)
    assert to_client[0].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert actions == [] and ex.state == State.STREAMING and ex.committed
    ex.node_upgraded(b"", 1.0)
    assert ex.state == State.TUNNEL and (X.A_TUNNEL, None) in take(ex)[2]
