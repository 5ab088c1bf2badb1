"""HEAD: the response has no body whatever its Content-Length says (RFC 9110 §9.3.2)."""

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import connect, request, start, take


def test_head_finishes_at_the_head_and_retires_the_connection() -> None:
    ex = start(request(b"HEAD"))
    connect(ex)
    ex.response_head(200, [(b"Content-Length", b"1000")], 1.0)
    to_client, _, actions = take(ex)
    head = b"".join(to_client)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head and b"chunked" not in head
    assert (X.A_NODE_DONE, False) in actions  # httptools would wait for the 1000 bytes
    assert actions[-1] == (X.A_FINISH, False) and ex.state == State.DONE


def test_head_without_length_is_not_chunked() -> None:
    ex = start(request(b"HEAD"))
    connect(ex)
    ex.response_head(200, [(b"Content-Type", b"text/html")], 1.0)
    to_client, _, _ = take(ex)
    assert b"Transfer-Encoding" not in b"".join(to_client)
