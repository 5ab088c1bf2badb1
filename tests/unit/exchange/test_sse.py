"""SSE (text/event-stream): the head leaves at once, each event as it arrives (no buffering, no
Content-Length: chunked to HTTP/1.1, DATA frames on HTTP/2, close-delimited to HTTP/1.0), no
read timeout but a lifetime (proxy.sse_max_lifetime); how the stream ends decides the client's
connection."""

from typing import Any

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import connect, kinds, request, settings, start, take

EVENTS = "/api/client/v2/conferences/a/events"
SSE = (b"Content-Type", b"text/event-stream")
CHUNKED = (b"Transfer-Encoding", b"chunked")


def _stream(version: str = "1.1", keep_alive: bool = True, **kw: Any) -> X.Exchange:
    """An events request whose node has answered 200 text/event-stream (chunked), head sent."""
    req = request(target=EVENTS, version=version)
    req.keep_alive = keep_alive
    ex = start(req, settings(**kw))
    connect(ex)
    ex.response_head(200, [SSE, (b"Cache-Control", b"no-cache"), CHUNKED], 10.0)
    ex.flush_head()
    return ex


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


def test_head_has_no_length_and_the_lifetime_replaces_the_read_timeout() -> None:
    ex = start(request(target=EVENTS), settings(read_timeout=60.0, sse_lifetime=3600.0))
    connect(ex)
    ex.response_head(200, [SSE, CHUNKED], 5.0)
    ex.flush_head()
    to_client, _, actions = take(ex)
    head = to_client[0]
    assert b"Content-Length" not in head and head.count(b"Transfer-Encoding") == 1
    assert b"Content-Type: text/event-stream\r\n" in head
    assert actions == [(X.A_NODE_TIMER, (0.0, 3605.0))]  # no idle timeout, one deadline
    assert ex.sse and not ex.until_close  # the node frames it: its end is a clean end


def test_events_flushed_one_by_one() -> None:
    ex = _stream()
    take(ex)
    events = [b"event: participant_create\ndata: {}\n\n", b": keepalive\n\n", b"data: 3\n\n"]
    for event in events:
        ex.response_body(event)
        to_client, to_node, actions = take(ex)
        # Each event leaves in the event that brought it: nothing held back for the next.
        assert to_client == [b"%x\r\n%s\r\n" % (len(event), event)]
        assert to_node == [] and actions == []
    assert ex.sent == sum(map(len, events)) and ex.state == State.STREAMING


def test_head_and_first_event_in_one_read_are_one_write() -> None:
    ex = start(request(target=EVENTS))
    connect(ex)
    ex.response_head(200, [SSE, CHUNKED], 1.0)
    ex.response_body(b"data: 1\n\n")
    to_client, _, _ = take(ex)
    assert len(to_client) == 1 and to_client[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")


def test_over_http2_events_are_raw_data() -> None:
    """proxy/h2.py turns the head into HEADERS and each body write into DATA: no chunking."""
    ex = _stream(version="2.0")
    to_client, _, _ = take(ex)
    assert b"Transfer-Encoding" not in to_client[0]
    ex.response_body(b"data: 1\n\n")
    assert take(ex)[0] == [b"data: 1\n\n"]


def test_clean_end_keeps_both_connections() -> None:
    ex = _stream()
    take(ex)
    ex.response_body(b"data: bye\n\n")
    ex.response_end(True, 20.0)
    to_client, _, actions = take(ex)
    assert to_client[-1] == b"0\r\n\r\n"
    assert (X.A_NODE_DONE, True) in actions and actions[-1] == (X.A_FINISH, False)
    assert ex.state == State.DONE and ex.times == ["20.000"]  # from the attempt at 0


def test_client_that_asked_for_close_is_closed_after_the_stream() -> None:
    ex = _stream(keep_alive=False)
    to_client, _, _ = take(ex)
    assert b"Connection: close\r\n" in to_client[0]
    ex.response_end(True, 20.0)
    assert take(ex)[2][-1] == (X.A_FINISH, True)


def test_http10_client_gets_a_close_delimited_stream() -> None:
    ex = _stream(version="1.0")
    to_client, _, _ = take(ex)
    assert b"chunked" not in to_client[0] and b"Connection: close\r\n" in to_client[0]
    ex.response_body(b"data: 1\n\n")
    assert take(ex)[0] == [b"data: 1\n\n"]
    ex.response_end(True, 20.0)
    assert take(ex)[2][-1] == (X.A_FINISH, True)


def test_node_cutting_a_framed_stream_midway_truncates_the_client() -> None:
    """The node's chunked stream ends without its last chunk: the client must see a cut, not
    a clean end, and nothing is retried (the client has events already)."""
    ex = _stream()
    ex.response_body(b"data: 1\n\n")
    take(ex)
    ex.node_lost(30.0)
    to_client, _, actions = take(ex)
    assert to_client == []  # no terminating chunk
    assert actions == [(X.A_ABORT_CLIENT, None), (X.A_LOG, True)]
    assert X.A_CONNECT not in kinds(actions) and ex.state == State.DONE


def test_node_closing_an_unframed_stream_ends_it_cleanly() -> None:
    """No length and no chunked coding from the node: its close is the end (RFC 9112 §6.3
    item 8), so the client gets the last chunk and keeps its connection."""
    ex = start(request(target=EVENTS))
    connect(ex)
    ex.response_head(200, [SSE], 1.0)
    ex.response_body(b"data: 1\n\n")
    take(ex)
    assert ex.until_close
    ex.node_lost(2.0)
    to_client, _, actions = take(ex)
    assert to_client == [b"0\r\n\r\n"]
    assert (X.A_NODE_DONE, False) in actions and actions[-1] == (X.A_FINISH, False)


def test_client_leaving_midstream_releases_the_node() -> None:
    ex = _stream()
    ex.response_body(b"data: 1\n\n")
    take(ex)
    ex.client_lost(12.0)
    _, _, actions = take(ex)
    assert actions == [(X.A_NODE_DONE, False), (X.A_LOG, True)]
    ex.response_body(b"data: 2\n\n")  # a late read of the node's: dropped
    assert take(ex) == ([], [], [])


def test_media_type_is_matched_case_insensitively() -> None:
    """RFC 9110 §8.3.1: type and subtype are case-insensitive, and parameters may follow."""
    for value in (b"Text/Event-Stream", b"text/event-stream; charset=utf-8"):
        ex = start(request(target=EVENTS), settings(sse_lifetime=100.0))
        connect(ex)
        ex.response_head(200, [(b"Content-Type", value)], 1.0)
        assert ex.sse and (X.A_NODE_TIMER, (0.0, 101.0)) in take(ex)[2]
    ex = start(request())
    connect(ex)
    ex.response_head(200, [(b"Content-Type", b"text/html")], 1.0)
    assert not ex.sse and take(ex)[2] == []
