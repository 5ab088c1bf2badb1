"""RFC 9110 §15.2: 1xx responses from a node are not forwarded (the proxy sends its own 100)."""

from confedge.proxy.exchange import State

from .helpers import connect, request, start, take


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
