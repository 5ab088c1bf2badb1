"""SSE: the head leaves at once, no read timeout but a lifetime (proxy.sse_max_lifetime)."""

from confedge.proxy import exchange as X

from .helpers import connect, request, settings, start, take


def test_event_stream_head_flushed_and_lifetime_armed() -> None:
    ex = start(request(target="/api/client/v2/conferences/a/events"), settings(sse_lifetime=30.0))
    connect(ex)
    ex.response_head(200, [(b"Content-Type", b"text/event-stream")], 10.0)
    to_client, _, actions = take(ex)
    assert to_client == [] and (X.A_NODE_TIMER, (0.0, 40.0)) in actions
    ex.flush_head()  # end of the read that carried the head
    to_client, _, _ = take(ex)
    assert b"Transfer-Encoding: chunked" in to_client[0]
    ex.response_body(b"data: 1\n\n")
    to_client, _, _ = take(ex)
    assert to_client == [b"9\r\ndata: 1\n\n\r\n"]
    ex.node_timeout(40.0)  # the lifetime: the stream is cut, logged as truncated
    _, _, actions = take(ex)
    assert (X.A_ABORT_CLIENT, None) in actions and (X.A_LOG, True) in actions
