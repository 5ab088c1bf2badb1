"""How a request_token's reservation is settled when its client goes away (docs/GUARD.md
"Guesses in flight"): counted as a wrong PIN once a node may have judged it, given back when
none can have, never left to lapse (a lapsed reservation held its conference's slot for the
whole `ttl` and counted nothing: tests/integration/test_qa_guard_evasion.py has the attack)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from confedge.proxy import exchange as X
from confedge.proxy.exchange import Exchange, guard_pin
from confedge.proxy.request import Request

from .helpers import connect, request, settings, start, take

PIN = "/api/client/v2/conferences/meet/request_token"


def _pin_request(body: bytes | None = None) -> Request:
    req = request(b"POST", PIN, headers=[(b"pin", b"0000")], body=body)
    req.pin = b"0000"  # (what the adapters' header parsing sets)
    return req


def _admitted(body: bytes | None = None) -> Exchange:
    ex = start(_pin_request(body), settings(guard=True))
    if body is not None:  # buffered whole first, as the adapters do below request_buffer
        ex.req.body_size = len(body)
        ex.request_body(body, 0.0)
        ex.request_end(0.0)
    assert [k for k, _ in take(ex)[2]] == [X.A_RESERVE_PIN]
    ex.guard_admitted("ticket-1", 0.0, 0.1)
    return ex


def _settled(ex: Exchange) -> list[object]:
    return [a for k, a in take(ex)[2] if k == X.A_SETTLE_PIN]


LEAVE: list[Callable[[Exchange], None]] = [
    lambda ex: ex.client_lost(1.0),
    lambda ex: ex.client_cancelled(1.0),
]


@pytest.mark.parametrize("leave", LEAVE, ids=["lost", "cancelled"])
def test_hanging_up_before_the_answer_counts_a_wrong_pin(
    leave: Callable[[Exchange], None],
) -> None:
    ex = _admitted(b'{"display_name": "x"}')
    connect(ex)  # the whole request went to the node: it may have judged the PIN
    leave(ex)
    assert _settled(ex) == [("ticket-1", "meet", "0000", True)]
    assert ex.ticket is None


def test_hanging_up_after_a_403_head_counts_it() -> None:
    """The client saw the refusal's status line; the body (which says which 403) was cut."""
    ex = _admitted()
    connect(ex)
    ex.response_head(403, [(b"Content-Length", b"44")], 0.2)
    ex.response_body(b'{"status": "success", ')
    ex.client_lost(0.3)
    assert _settled(ex) == [("ticket-1", "meet", "0000", True)]


def test_hanging_up_after_a_200_head_gives_the_slot_back() -> None:
    ex = _admitted()
    connect(ex)
    ex.response_head(200, [(b"Content-Length", b"100")], 0.2)
    ex.client_lost(0.3)
    assert _settled(ex) == [("ticket-1", "meet", "0000", False)]


def test_hanging_up_before_a_node_got_it_gives_the_slot_back() -> None:
    ex = _admitted()
    assert ex.state == X.CONNECTING
    ex.client_lost(0.2)
    assert _settled(ex) == [("ticket-1", "meet", "0000", False)]


def test_a_body_cut_short_is_not_a_guess() -> None:
    """A body past request_buffer streams: the node got the head and part of the body, so no
    node can have answered it; the 408/413 that cancels it gives the slot back."""
    req = _pin_request(b"x" * 10)
    ex = start(req, settings(guard=True, request_buffer=2))
    req.body_size = 4
    ex.request_body(b"xxxx", 0.0)
    ex.guard_admitted("ticket-1", 0.0, 0.1)
    connect(ex)
    assert not ex.req.complete
    ex.client_cancelled(30.0)
    assert _settled(ex) == [("ticket-1", "meet", "0000", False)]


def test_an_answered_request_is_settled_once() -> None:
    ex = _admitted()
    connect(ex)
    ex.response_head(403, [(b"Content-Length", b"44")], 0.2)
    ex.response_body(b'{"status": "success", "result": "Invalid PIN"}')
    ex.response_end(True, 0.3)
    assert _settled(ex) == [("ticket-1", "meet", "0000", True)]
    ex.client_lost(0.4)
    assert _settled(ex) == []


def test_the_pin_the_guard_hashes_is_the_one_the_node_gets() -> None:
    """A `pin` named in Connection is dropped on the way to the node (RFC 9110 §7.6.1), so the
    guard hashes nothing for it (was: the dropped value, the same for every guess)."""
    req = _pin_request()
    assert guard_pin(req) == "0000"
    req.conn_tokens = b"keep-alive, pin"
    assert guard_pin(req) is None
    req.conn_tokens = b"pinned"
    assert guard_pin(req) == "0000"
    req.pin = None
    assert guard_pin(req) is None
