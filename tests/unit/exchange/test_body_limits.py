"""Request bodies: a small one is read whole before the first attempt (so failover can replay
it); one past proxy.request_buffer_bytes streams (chunked re-framed for the node)."""

from confedge.proxy.exchange import State

from .helpers import connect, request, settings, start, take


def test_small_body_buffered_then_sent_with_head() -> None:
    ex = start(request(b"PUT", "/api/x", body=b"abcdef"))
    ex.req.body_size = 3
    ex.request_body(b"abc", 0.0)
    assert ex.state == State.BUFFERING and take(ex)[2] == []
    ex.req.body_size = 6
    ex.request_body(b"def", 0.0)
    ex.request_end(0.0)
    _, sent = connect(ex)
    assert sent.endswith(b"Content-Length: 6\r\n\r\nabcdef")


def test_chunked_body_streams_past_buffer() -> None:
    req = request(b"POST", "/api/x", body=b"")
    req.content_length = None
    req.chunked = True
    ex = start(req, settings(request_buffer=2))
    req.body_size = 4
    ex.request_body(b"abcd", 0.0)
    _, sent = connect(ex)
    assert b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n" in sent
    ex.request_body(b"ef", 0.0)
    ex.request_end(0.0)
    _, to_node, _ = take(ex)
    assert to_node == [b"2\r\nef\r\n", b"0\r\n\r\n"]
