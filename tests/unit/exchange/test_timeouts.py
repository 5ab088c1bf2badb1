"""Node timers: read_timeout armed per attempt; a timeout before the head is a 504 attempt."""

from confedge.proxy import exchange as X

from .helpers import request, settings, start, take


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
