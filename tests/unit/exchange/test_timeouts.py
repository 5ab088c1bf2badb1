"""Node timers in simulated time. The core decides and the adapters keep the clocks:
- connect: A_CONNECT carries the timeout (proxy.connect_timeout, api_connect_timeout under
  /api); upstream.py enforces it and reports node_connect_failed: the node is marked failed and
  the next one tried; with none left the client gets the 502 page (a connect failure is "502" in
  $upstream_status, a silent node "504", and the page follows the last attempt's).
- read: A_NODE_TIMER (read_timeout, now + read_timeout) per attempt; a timeout before the head
  is a 504 attempt (failover), after it the response is cut (nothing can be retried).
- SSE: (0, now + sse_lifetime); a tunnel: (0, inf)."""

import math
from typing import Any

from confedge.proxy import exchange as X
from confedge.proxy.exchange import State

from .helpers import kinds, request, settings, start, take


def _connects(actions: list[tuple[int, Any]]) -> list[Any]:
    return [a for k, a in actions if k == X.A_CONNECT]


def test_read_timeout_armed_and_retried() -> None:
    ex = start(request(), settings(2, read_timeout=7.0), now=100.0)
    take(ex)
    ex.node_connected(100.0)
    _, _, actions = take(ex)
    assert (X.A_NODE_TIMER, (7.0, 107.0)) in actions
    ex.node_timeout(107.0)
    _, _, actions = take(ex)
    assert (X.A_NODE_DONE, False) in actions and X.A_CONNECT in [k for k, _ in actions]
    assert ex.statuses == ["504"] and ex.times == ["7.000"]


def test_connect_timeout_depends_on_the_path() -> None:
    st = settings(connect_timeout=3.0, api_connect_timeout=20.0)
    for target, timeout in (("/webapp/home", 3.0), ("/api/client/v2/status", 20.0)):
        ex = start(request(target=target), st)
        assert [a[1] for a in _connects(take(ex)[2])] == [timeout]


def test_connect_timeout_fails_over_then_502_page() -> None:
    ex = start(request(), settings(2, connect_timeout=3.0), now=50.0)
    (first,) = _connects(take(ex)[2])
    i = first[0]
    ex.node_connect_failed(i, "connect timeout (3 s)", 53.0)
    _, _, actions = take(ex)
    assert actions[0] == (X.A_MARK_FAILED, (i, "connect timeout (3 s)", False))
    (second,) = _connects(actions)
    j = second[0]
    assert j != i and ex.state == State.CONNECTING
    ex.node_connect_failed(j, "connect timeout (3 s)", 56.0)
    _, _, actions = take(ex)
    assert (X.A_LOCAL, (502, b"", True)) in actions and ex.state == State.DONE
    assert ex.statuses == ["502", "502"] and ex.times == ["3.000", "3.000"]
    assert ex.settings.nodes.active == [0, 0]  # both attempts released


def test_the_page_follows_the_last_attempts_kind() -> None:
    # connect failure, then a silent node: 504
    ex = start(request(), settings(2))
    i = _connects(take(ex)[2])[0][0]
    ex.node_connect_failed(i, "connect timeout (3 s)", 3.0)
    take(ex)
    ex.node_connected(3.0)
    take(ex)
    ex.node_timeout(63.0)
    assert (X.A_LOCAL, (504, b"", True)) in take(ex)[2] and ex.statuses == ["502", "504"]
    # a silent node, then a connect failure: 502
    ex = start(request(), settings(2))
    take(ex)
    ex.node_connected(0.0)
    take(ex)
    ex.node_timeout(60.0)
    j = _connects(take(ex)[2])[0][0]
    ex.node_connect_failed(j, "connect error: refused", 60.5)
    assert (X.A_LOCAL, (502, b"", True)) in take(ex)[2] and ex.statuses == ["504", "502"]


def test_connect_failure_reported_late_only_marks_the_node() -> None:
    """A connect attempt that fails after the exchange moved on (the client left) blames the
    node but starts nothing."""
    ex = start(request())
    i = _connects(take(ex)[2])[0][0]
    ex.client_lost(1.0)
    take(ex)
    ex.node_connect_failed(i, "connect timeout (3 s)", 3.0)
    assert take(ex)[2] == [(X.A_MARK_FAILED, (i, "connect timeout (3 s)", False))]


def test_read_timeout_before_the_head_blames_the_node_and_fails_over() -> None:
    ex = start(request(), settings(2, read_timeout=10.0))
    take(ex)
    ex.node_connected(1.0)
    first = ex.node
    take(ex)
    ex.node_timeout(11.0)
    _, _, actions = take(ex)
    assert actions[:2] == [
        (X.A_NODE_DONE, False),  # the silent connection is closed, never pooled
        (X.A_MARK_FAILED, (first, "no response within proxy.read_timeout", False)),
    ]
    assert kinds(actions)[-1] == X.A_CONNECT and ex.node != first
    ex.node_connected(11.5)
    assert (X.A_NODE_TIMER, (10.0, 21.5)) in take(ex)[2]  # re-armed from the new `now`


def test_read_timeout_after_the_response_started_cuts_it() -> None:
    ex = start(request(), settings(2, read_timeout=10.0))
    take(ex)
    ex.node_connected(1.0)
    ex.response_head(200, [(b"Content-Length", b"100")], 2.0)
    ex.response_body(b"x" * 40)
    take(ex)
    ex.node_timeout(12.0)
    to_client, _, actions = take(ex)
    assert to_client == []
    assert actions == [(X.A_NODE_DONE, False), (X.A_ABORT_CLIENT, None), (X.A_LOG, True)]
    assert (
        ex.statuses == ["200"] and ex.times == ["12.000"] and ex.state == State.DONE
    )  # from the attempt at 0


def test_timeout_after_the_end_is_ignored() -> None:
    ex = start(request())
    take(ex)
    ex.node_connected(0.0)
    ex.response_head(200, [(b"Content-Length", b"0")], 0.1)
    ex.response_end(True, 0.1)
    take(ex)
    ex.node_timeout(60.0)
    assert take(ex) == ([], [], []) and ex.statuses == ["200"]


def test_timer_deadlines_for_sse_and_tunnels() -> None:
    ex = start(request(target="/api/client/v2/conferences/a/events"), settings(sse_lifetime=90.0))
    take(ex)
    ex.node_connected(5.0)
    assert take(ex)[2] == [(X.A_NODE_TIMER, (60.0, 65.0))]  # read_timeout until the head
    ex.response_head(200, [(b"Content-Type", b"text/event-stream")], 6.0)
    assert take(ex)[2] == [(X.A_NODE_TIMER, (0.0, 96.0))]  # then the lifetime, from the head
    ws = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    ex = start(request(headers=ws))
    ex.client_upgrade()
    take(ex)
    ex.node_connected(1.0)
    ex.response_head(101, [], 1.0)
    ex.node_upgraded(b"", 1.0)
    timers = [a for k, a in take(ex)[2] if k == X.A_NODE_TIMER]
    assert timers[-1] == (0.0, math.inf)  # a tunnel has its own idle timeout (client side)


def test_client_timeout_while_waiting_releases_the_node() -> None:
    """The client side's body timeout (an adapter's timer) ends the exchange as an event."""
    ex = start(request(b"POST", "/api/x", body=b"abcdef"), settings(request_buffer=2))
    ex.req.body_size = 3
    ex.request_body(b"abc", 0.0)  # past request_buffer: the attempt starts
    take(ex)
    ex.node_connected(0.1)
    take(ex)
    ex.client_cancelled(30.0)
    _, _, actions = take(ex)
    assert actions == [(X.A_NODE_DONE, False)] and ex.state == State.DONE
    assert ex.times == ["30.000"] and ex.settings.nodes.active == [0, 0, 0]
