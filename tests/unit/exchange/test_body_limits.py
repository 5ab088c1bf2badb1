"""Bodies and their framing, as the core decides them.

Where the limits live: `proxy.max_body_bytes` (413) and `proxy.body_timeout` (408) are the
client adapters' (server.py `_vet`/`on_body`, h2.py `H2Stream.body`): they count each chunk
before it becomes a `request_body` event, and a refused request reaches the core as
`client_cancelled`. The core owns `proxy.request_buffer_bytes` (a body up to it is read whole
before the first attempt, a larger one streams), the retained copy for failover (kept until the
response is committed), the request framing towards the node, the response framing towards the
client (RFC 9112 §6.3, HEAD/204/304 without a body) and the 64 KiB cap on the copy of a
PIN/token answer the guard reads."""

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State, plan_response

from .helpers import connect, kinds, request, settings, start, take

PIN = "/api/client/v2/conferences/meet/request_token"


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


def test_a_body_of_exactly_the_buffer_size_is_still_buffered() -> None:
    ex = start(request(b"POST", "/api/x", body=b"abcdefg"), settings(request_buffer=6))
    ex.req.body_size = 6
    ex.request_body(b"abcdef", 0.5)
    assert ex.state == State.BUFFERING and take(ex) == ([], [], [])
    ex.req.body_size = 7  # one byte past: the attempt starts, retained chunks first
    ex.request_body(b"g", 0.6)
    assert ex.state == State.CONNECTING and ex.upstream_time == 0.6
    _, sent = connect(ex, 0.7)
    assert sent.endswith(b"Content-Length: 7\r\n\r\nabcdefg")


def test_a_streamed_body_is_still_replayed_until_the_answer_starts() -> None:
    ex = start(request(b"POST", "/api/x", body=b"abcdef"), settings(2, request_buffer=2))
    ex.req.body_size = 3
    ex.request_body(b"abc", 0.0)
    first, sent1 = connect(ex)
    ex.req.body_size = 6
    ex.request_body(b"def", 0.1)  # streamed to the node as it arrives
    ex.request_end(0.1)
    assert take(ex)[1] == [b"def"]
    ex.node_lost(0.2)  # no answer: the whole body goes to the next node
    _, _, actions = take(ex)
    assert kinds(actions) == [X.A_MARK_FAILED, X.A_CONNECT]
    assert actions[1][1][0] != first
    ex.node_connected(0.3)
    sent2 = b"".join(take(ex)[1])
    assert sent2 == sent1 + b"def"
    assert sent2.endswith(b"Content-Length: 6\r\n\r\nabcdef")


def test_the_retained_copy_is_dropped_when_the_answer_starts() -> None:
    ex = start(request(b"POST", "/api/x", body=b"abcdef"), settings(request_buffer=2))
    ex.req.body_size = 3
    ex.request_body(b"abc", 0.0)
    connect(ex)
    ex.response_head(200, [(b"Content-Length", b"0")], 0.1)  # answered before the body ended
    assert not ex.req.retain and ex.req.body == [b"abc"]
    ex.request_body(b"def", 0.2)  # still forwarded, no longer kept
    assert take(ex)[1] == [b"def"] and ex.req.body == [b"abc"]
    ex.request_end(0.2)
    assert ex.req.body == []


def test_content_length_is_sent_once_from_the_parsed_value() -> None:
    req = request(b"PUT", "/api/x", headers=[(b"Content-Length", b"3")], body=b"abc")
    ex = start(req)
    ex.request_body(b"abc", 0.0)
    ex.request_end(0.0)
    _, sent = connect(ex)
    assert sent.lower().count(b"content-length") == 1 and sent.endswith(b"\r\n\r\nabc")


def test_response_framing_decisions() -> None:
    """RFC 9112 §6.3 and RFC 9110 §6.4.1: (status, node's framing, HEAD, client version) ->
    (chunked to the client, body ends with the node's close, client connection closed)."""
    cl = [(b"Content-Length", b"5")]
    te = [(b"Transfer-Encoding", b"chunked")]
    cases = [
        (200, cl, False, "1.1", (False, False, False)),
        (200, te, False, "1.1", (True, False, False)),
        (200, [], False, "1.1", (True, True, False)),
        (200, [], False, "1.0", (False, True, True)),
        (200, te, False, "2.0", (False, False, False)),  # DATA frames (proxy/h2.py)
        (200, [], True, "1.1", (False, False, False)),  # HEAD
        (204, [], False, "1.1", (False, False, False)),
        (304, [], False, "1.1", (False, False, False)),
        (304, te, False, "1.0", (False, False, False)),
    ]
    for status, headers, head_only, version, want in cases:
        plan = plan_response(
            status, headers, head_only=head_only, version=version, keep_alive=True, csp_line=b""
        )
        assert (plan.chunked, plan.until_close, plan.close) == want, (status, headers, version)
        assert (b"Transfer-Encoding: chunked" in plan.head) == plan.chunked
        assert plan.head.count(b"Content-Length") == (1 if headers is cl else 0)


def test_length_delimited_body_passes_unframed_and_reuses_the_node() -> None:
    ex = start(request())
    connect(ex)
    ex.response_head(200, [(b"Content-Length", b"5")], 0.1)
    ex.response_body(b"he")
    ex.response_body(b"llo")
    ex.response_end(True, 0.2)
    to_client, _, actions = take(ex)
    assert b"".join(to_client).endswith(b"Content-Length: 5\r\n\r\nhello")
    assert (X.A_NODE_DONE, True) in actions and ex.sent == 5


def test_no_body_statuses_end_at_the_head() -> None:
    for status in (204, 304):
        ex = start(request())
        connect(ex)
        ex.response_head(status, [], 0.1)
        ex.response_end(True, 0.1)
        to_client, _, actions = take(ex)
        assert b"".join(to_client).endswith(b"\r\n\r\n") and b"0\r\n\r\n" not in to_client
        assert (X.A_NODE_DONE, True) in actions and actions[-1] == (X.A_FINISH, False)


def test_close_delimited_body_never_returns_the_connection() -> None:
    ex = start(request())
    connect(ex)
    ex.response_head(200, [], 0.1)
    ex.response_body(b"abc")
    ex.response_end(True, 0.2)  # (httptools says keep-alive: the close is the end)
    to_client, _, actions = take(ex)
    assert b"".join(to_client).endswith(b"3\r\nabc\r\n0\r\n\r\n")
    assert (X.A_NODE_DONE, False) in actions


def test_an_incomplete_request_never_returns_the_node_connection() -> None:
    """The node answered before the request body ended: the connection still expects the rest
    of it, so it is closed, not pooled."""
    ex = start(request(b"POST", "/api/x", body=b"abcdef"), settings(request_buffer=2))
    ex.req.body_size = 3
    ex.request_body(b"abc", 0.0)
    connect(ex)
    ex.response_head(413, [(b"Content-Length", b"0")], 0.1)
    ex.response_end(True, 0.1)
    assert (X.A_NODE_DONE, False) in take(ex)[2]


def _pin_answer(chunks: list[bytes]) -> list[tuple[int, object]]:
    ex = start(request(b"POST", PIN), settings(guard=True))
    assert take(ex)[2] == [(X.A_RESERVE_PIN, ("meet", 3 * (5.0 + 60.0)))]
    ex.guard_admitted("ticket-1", 0.0, 0.1)
    connect(ex)
    ex.response_head(403, [(b"Content-Length", b"%d" % sum(map(len, chunks)))], 0.2)
    for chunk in chunks:
        ex.response_body(chunk)
    ex.response_end(True, 0.3)
    to_client, _, actions = take(ex)
    assert b"".join(to_client).endswith(b"".join(chunks))  # the client gets it all
    return actions


def test_the_guard_reads_a_pin_answer() -> None:
    actions = _pin_answer([b'{"status": "success", ', b'"result": "Invalid PIN"}'])
    assert (X.A_SETTLE_PIN, ("ticket-1", "meet", None, True)) in actions


def test_the_guards_copy_of_a_pin_answer_stops_at_64_kib() -> None:
    """A node answer larger than the cap is relayed whole; the guard's copy stops growing once
    it holds 64 KiB, so such an answer is not read as an Invalid PIN."""
    body = b'{"result": "Invalid PIN", "pad": "' + b"x" * 80_000 + b'"}'
    chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
    actions = _pin_answer(chunks)
    assert (X.A_SETTLE_PIN, ("ticket-1", "meet", None, False)) in actions
