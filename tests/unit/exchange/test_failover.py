"""Failover policy (SPEC §2): retry on connect error/timeout or 500/502/503/504, POST included,
only while the body is held whole and nothing reached the client."""

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State, may_retry

from .helpers import connect, kinds, request, settings, start, take


def test_policy_table() -> None:
    kw = {"committed": False, "body_complete": True, "retained": True, "more": True}
    for status in (500, 502, 503, 504, None):
        assert may_retry(status, **kw)
    for status in (200, 403, 404, 501):
        assert not may_retry(status, **kw)
    assert not may_retry(502, **{**kw, "committed": True})
    assert not may_retry(502, **{**kw, "retained": False})
    assert not may_retry(502, **{**kw, "more": False})
    assert not may_retry(502, **{**kw, "body_complete": False})


def test_post_replayed_on_next_node_after_502() -> None:
    ex = start(request(b"POST", "/api/x", body=b"hello"))
    assert ex.state == State.BUFFERING
    ex.request_body(b"hello", 1.0)
    ex.request_end(1.0)
    first, sent1 = connect(ex)
    assert sent1.endswith(b"\r\n\r\nhello")
    ex.response_head(502, [(b"Content-Length", b"0")], 1.5)
    _, _, actions = take(ex)
    assert X.A_NODE_DONE in kinds(actions) and X.A_MARK_FAILED in kinds(actions)
    second = next(a for k, a in actions if k == X.A_CONNECT)[0]
    assert second != first
    ex.node_connected(1.6)
    _, to_node, _ = take(ex)
    assert b"".join(to_node) == sent1  # same head and body replayed
    ex.response_head(200, [(b"Content-Length", b"2")], 2.0)
    ex.response_body(b"ok")
    ex.response_end(True, 2.0)
    to_client, _, actions = take(ex)
    assert b"".join(to_client).startswith(b"HTTP/1.1 200")
    assert ex.statuses == ["502", "200"] and len(ex.addrs) == 2
    assert kinds(actions)[-1] == X.A_FINISH and ex.state == State.DONE


def test_connect_errors_exhaust_nodes_then_502_page() -> None:
    ex = start(request())
    for _ in range(3):
        _, _, actions = take(ex)
        i = next(a for k, a in actions if k == X.A_CONNECT)[0]
        ex.node_connect_failed(i, "connect error: refused", 0.1)
    _, _, actions = take(ex)
    local = [a for k, a in actions if k == X.A_LOCAL]
    assert local == [(502, b"", True)] and ex.state == State.DONE


def test_timeout_gives_504_after_last_node() -> None:
    ex = start(request(), settings(1))
    connect(ex)
    ex.node_timeout(60.0)
    _, _, actions = take(ex)
    assert (X.A_LOCAL, (504, b"", True)) in actions


def test_no_retry_once_the_client_got_bytes() -> None:
    ex = start(request())
    connect(ex)
    ex.response_head(200, [(b"Transfer-Encoding", b"chunked")], 1.0)
    ex.response_body(b"x")
    take(ex)
    ex.node_lost(2.0)
    _, _, actions = take(ex)
    assert X.A_ABORT_CLIENT in kinds(actions) and X.A_CONNECT not in kinds(actions)


def test_no_retry_on_503_before_the_body_is_complete() -> None:
    st = settings(request_buffer=4)
    ex = start(request(b"POST", "/api/x", body=b"0123456789"), st)
    ex.req.body_size = 6  # the adapter counts the body against its limits
    ex.request_body(b"012345", 0.0)  # larger than request_buffer: streamed from now on
    assert ex.state == State.CONNECTING
    connect(ex)
    ex.response_head(503, [(b"Content-Length", b"0")], 1.0)
    _, _, actions = take(ex)
    assert X.A_CONNECT not in kinds(actions)  # answered as the node said
    assert ex.status == 503 and ex.state == State.STREAMING


def test_reused_connection_closed_by_node_replays_on_same_node() -> None:
    ex = start(request())
    _, _, actions = take(ex)
    i = next(a for k, a in actions if k == X.A_CONNECT)[0]
    ex.node_connected(0.0, reused=True)
    take(ex)
    ex.node_lost(0.1, got_bytes=False)
    _, _, actions = take(ex)
    assert X.A_CONNECT in kinds(actions)  # replayed, and the node was not blamed
    assert X.A_MARK_FAILED not in kinds(actions)
    assert ex.addrs == [ex.settings.netlocs[ex.node]] and ex.statuses == []
    assert i >= 0
