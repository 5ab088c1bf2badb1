"""Response heads the proxy must not pass on (RFC 9110 §15, RFC 9112 §6.1), and events about a
node connection the exchange has already left. An invalid head is handled like a response that
cannot be parsed: the connection is closed, the node marked failed, and the request fails over
while nothing reached the client (else the 502 page). tests/integration/test_proxy_hostile_node.py
sends the same through sockets."""

import pytest

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import connect, kinds, request, settings, start, take


def _invalid(status: int, headers: list[tuple[bytes, bytes]], nodes: int = 3) -> X.Exchange:
    ex = start(request(), settings(nodes))
    connect(ex)
    ex.response_head(status, headers, 1.0)
    return ex


@pytest.mark.parametrize("status", [0, 99, 600, 999])
def test_status_outside_100_599_fails_over(status: int) -> None:
    ex = _invalid(status, [(b"Content-Length", b"2")])
    to_client, _, actions = take(ex)
    assert to_client == [] and not ex.committed
    assert kinds(actions) == [X.A_NODE_DONE, X.A_MARK_FAILED, X.A_CONNECT]
    assert actions[0] == (X.A_NODE_DONE, False)
    assert actions[1][1][1] == f"invalid response from node: status {status}"
    assert ex.state == State.CONNECTING and ex.statuses == ["502"]


def test_status_outside_100_599_from_the_last_node_gets_the_502_page() -> None:
    ex = _invalid(600, [(b"Content-Length", b"2")], nodes=1)
    _, _, actions = take(ex)
    assert actions[-1] == (X.A_LOCAL, (502, b"", True)) and ex.state == State.DONE


@pytest.mark.parametrize(
    "coding", [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked;x"]
)
def test_transfer_coding_other_than_chunked_is_not_passed_on(coding: bytes) -> None:
    """The proxy drops Transfer-Encoding (hop-by-hop) and cannot take a coding off: passing
    the body on would hand the client gzip bytes as if they were the content."""
    ex = _invalid(200, [(b"Transfer-Encoding", coding)])
    to_client, _, actions = take(ex)
    assert to_client == [] and kinds(actions)[:2] == [X.A_NODE_DONE, X.A_MARK_FAILED]
    assert "transfer coding" in actions[1][1][1] and not ex.committed


@pytest.mark.parametrize("spelling", [b"chunked", b"Chunked", b" chunked "])
def test_chunked_in_any_case_passes(spelling: bytes) -> None:
    ex = _invalid(200, [(b"Transfer-Encoding", spelling)])
    ex.response_body(b"ok")
    ex.response_end(True, 1.0)
    to_client, _, _ = take(ex)
    assert b"".join(to_client).endswith(b"2\r\nok\r\n0\r\n\r\n") and ex.statuses == ["200"]


def test_plan_response_reports_an_unknown_coding_with_an_empty_head() -> None:
    plan = X.plan_response(
        200,
        [(b"Transfer-Encoding", b"br")],
        head_only=False,
        version="1.1",
        keep_alive=True,
        csp_line=b"",
    )
    assert plan.head == b""


def test_bad_bytes_after_a_retried_503_do_not_blame_the_next_node() -> None:
    """A 503 head fails over at once (CONNECTING to the next node); when the bytes after it in
    the same read cannot be parsed, the adapter reports node_failed, which used to mark the
    *next* node failed and start a second attempt beside the first."""
    ex = start(request(), settings(3))
    connect(ex)
    ex.response_head(503, [(b"Content-Length", b"0")], 1.0)
    _, _, actions = take(ex)
    assert kinds(actions) == [X.A_MARK_FAILED, X.A_NODE_DONE, X.A_CONNECT]
    next_node = actions[-1][1][0]
    ex.response_end(True, 1.0)
    ex.node_failed("invalid response from node: Expected HTTP/", 1.0)
    assert take(ex) == ([], [], [])
    assert ex.state == State.CONNECTING and ex.node == next_node
    assert ex.settings.nodes.active[next_node] == 1
