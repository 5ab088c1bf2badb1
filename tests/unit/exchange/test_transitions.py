"""The transition table is the whole truth about `Exchange.state`:

- only `Exchange._go` writes `state` (and `__init__`, START), in the source of the core, and no
  adapter writes any field of an exchange: what they learn goes in as an event;
- every edge of TRANSITIONS is taken by real events (no dead row, and each step takes exactly
  the edges it should: the conftest guard records them in the interpreted build);
- every pair the table leaves out raises ExchangeError and leaves the state as it was, through
  `_go` and through public events an adapter could call at the wrong moment.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from confedge.proxy import exchange as X
from confedge.proxy.exchange import TRANSITIONS, Exchange, ExchangeError, State

from .conftest import StateWrites
from .helpers import connect, kinds, request, settings, start, take

S = State
SRC = Path(__file__).resolve().parents[3] / "src" / "confedge" / "proxy"
ADAPTERS = ["server.py", "h2.py", "upstream.py", "core.py", "service.py"]
PIN = "/api/client/v2/conferences/meet/request_token"
WS = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


def _assigned(node: ast.AST) -> list[ast.expr]:
    """The targets an assignment statement writes (tuples unpacked)."""
    if isinstance(node, ast.Assign):
        todo = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        todo = [node.target]
    else:
        return []
    out: list[ast.expr] = []
    while todo:
        t = todo.pop()
        if isinstance(t, ast.Tuple | ast.List):
            todo += t.elts
        else:
            out.append(t)
    return out


def test_only_go_writes_state_in_the_core() -> None:
    tree = ast.parse((SRC / "exchange.py").read_text())
    writers = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                for t in _assigned(node):
                    if isinstance(t, ast.Attribute) and t.attr == "state":
                        writers.append(fn.name)
    assert sorted(writers) == ["__init__", "_go"]


def test_adapters_write_no_exchange_field() -> None:
    """`ex` (or `<x>.exchange`, upstream's `self.ex`) is the adapters' name for an Exchange;
    they may only take its decisions (the `actions` outbox swap), never set its fields."""
    found = []
    for name in ADAPTERS:
        tree = ast.parse((SRC / name).read_text())
        for node in ast.walk(tree):
            for t in _assigned(node):
                if not isinstance(t, ast.Attribute):
                    continue
                obj = t.value
                is_ex = (isinstance(obj, ast.Name) and obj.id == "ex") or (
                    isinstance(obj, ast.Attribute) and obj.attr in ("exchange", "ex")
                )
                if is_ex and t.attr != "actions":
                    found.append(f"{name}:{t.lineno}: {ast.unparse(t)}")
    assert found == []


# -- the table walked by events ---------------------------------------------------------------


class Walk:
    """Drives events and checks the edges each one takes (recorded when the guard is on)."""

    def __init__(self, writes: StateWrites | None) -> None:
        self.writes = writes
        self.edges: set[tuple[State, State]] = set()

    def step(self, ex: Exchange, event: Callable[[], object], *through: State) -> None:
        before = State(ex.state)
        if self.writes is not None:
            self.writes.clear()
        event()
        chain = [before, *through]
        expected = list(pairwise(chain))
        if self.writes is not None:
            assert self.writes.of(ex) == expected
        assert ex.state == chain[-1]
        self.edges |= set(expected)


def _reach(walk: Walk, target: State) -> Exchange:
    """An exchange brought to `target` by events only."""
    if target == S.START:
        return Exchange(settings(), request(), client_ip="192.0.2.7", peer="192.0.2.7")
    if target == S.BUFFERING:
        ex = _reach(walk, S.START)
        ex.req = request(b"POST", "/api/x", body=b"abc")
        walk.step(ex, lambda: ex.start(0.0, buffer_body=True), S.BUFFERING)
        return ex
    if target == S.GUARD:
        ex = Exchange(
            settings(guard=True),
            request(b"POST", PIN),
            client_ip="192.0.2.7",
            peer="192.0.2.7",
        )
        walk.step(ex, lambda: ex.start(0.0, buffer_body=False), S.GUARD)
        return ex
    if target == S.CONNECTING:
        ex = _reach(walk, S.START)
        walk.step(ex, lambda: ex.start(0.0, buffer_body=False), S.CONNECTING)
        return ex
    if target == S.WAITING:
        ex = _reach(walk, S.CONNECTING)
        walk.step(ex, lambda: ex.node_connected(0.1), S.WAITING)
        return ex
    if target == S.STREAMING:
        ex = _reach(walk, S.WAITING)
        walk.step(ex, lambda: ex.response_head(200, [(b"Content-Length", b"1")], 0.2), S.STREAMING)
        return ex
    if target == S.TUNNEL:
        ex = Exchange(settings(), request(headers=WS), client_ip="192.0.2.7", peer="192.0.2.7")
        walk.step(ex, lambda: ex.start(0.0, buffer_body=False), S.CONNECTING)
        assert ex.client_upgrade()
        walk.step(ex, lambda: ex.node_connected(0.1), S.WAITING)
        walk.step(ex, lambda: ex.response_head(101, [], 0.2), S.STREAMING)
        walk.step(ex, lambda: ex.node_upgraded(b"", 0.2), S.TUNNEL)
        return ex
    ex = _reach(walk, S.STREAMING)
    walk.step(ex, lambda: ex.response_end(True, 0.3), S.DONE)
    return ex


def test_every_edge_of_the_table_is_taken_by_events(state_writes: StateWrites | None) -> None:
    w = Walk(state_writes)
    for target in State:
        _reach(w, target)  # START->BUFFERING/GUARD/CONNECTING, ->WAITING->STREAMING->TUNNEL...

    ex = _reach(w, S.START)
    w.step(ex, lambda: ex.served_locally(200, 5), S.STREAMING)  # START -> STREAMING
    ex = Exchange(settings(), request(), client_ip="192.0.2.7", peer="192.0.2.7")
    ex.settings.nodes.up[:] = [False, False, False]
    w.step(ex, lambda: ex.start(0.0, buffer_body=False), S.DONE)  # no node: 503 page
    assert (X.A_LOCAL, (503, b"", True)) in take(ex)[2]

    ex = _reach(w, S.BUFFERING)
    w.step(ex, lambda: ex.request_end(0.1), S.CONNECTING)
    ex = _reach(w, S.BUFFERING)
    w.step(ex, lambda: ex.client_lost(0.1), S.DONE)
    ex = Exchange(settings(guard=True), request(b"POST", PIN, body=b"{}"), client_ip="c", peer="c")
    w.step(ex, lambda: ex.start(0.0, buffer_body=True), S.BUFFERING)
    w.step(ex, lambda: ex.request_end(0.1), S.GUARD)  # BUFFERING -> GUARD

    ex = _reach(w, S.GUARD)
    w.step(ex, lambda: ex.guard_admitted("t1", 0.0, 0.1), S.CONNECTING)
    ex = _reach(w, S.GUARD)
    w.step(ex, lambda: ex.guard_admitted(None, 3.0, 0.1), S.DONE)  # 429

    ex = _reach(w, S.CONNECTING)
    i = ex.node
    w.step(ex, lambda: ex.node_connect_failed(i, "refused", 0.1), S.CONNECTING)
    w.step(ex, lambda: ex.node_connect_failed(ex.node, "refused", 0.1), S.CONNECTING)
    w.step(ex, lambda: ex.node_connect_failed(ex.node, "refused", 0.1), S.DONE)

    ex = _reach(w, S.WAITING)
    w.step(ex, lambda: ex.response_head(502, [], 0.2), S.CONNECTING)
    ex = Exchange(settings(1), request(), client_ip="c", peer="c")
    w.step(ex, lambda: ex.start(0.0, buffer_body=False), S.CONNECTING)
    w.step(ex, lambda: ex.node_connected(0.0), S.WAITING)
    w.step(ex, lambda: ex.node_timeout(60.0), S.DONE)  # 504 page

    ex = _reach(w, S.TUNNEL)
    w.step(ex, lambda: ex.node_lost(9.0), S.DONE)

    allowed = {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts}
    assert w.edges == allowed


@pytest.mark.parametrize("state", list(State))
def test_every_pair_outside_the_table_raises(state: State) -> None:
    for new in State:
        if new in TRANSITIONS[state]:
            continue
        ex = _reach(Walk(None), state)
        with pytest.raises(ExchangeError, match=f"{state.name} -> {new.name}"):
            ex._go(new)
        assert ex.state == state


def test_events_at_the_wrong_moment_raise() -> None:
    """An adapter that feeds an event its state cannot take is stopped, not obeyed."""
    ex = start(request())  # CONNECTING
    with pytest.raises(ExchangeError, match="CONNECTING -> STREAMING"):
        ex.served_locally(200, 1)
    ex = Exchange(settings(), request(), client_ip="c", peer="c")  # START
    with pytest.raises(ExchangeError, match="START -> WAITING"):
        ex.node_connected(0.0)
    assert ex.state == S.START


# -- answers the proxy makes itself -----------------------------------------------------------


def test_served_locally_goes_through_the_table_and_counts_its_bytes() -> None:
    ex = Exchange(settings(), request(), client_ip="c", peer="c")
    ex.served_locally(200, 10)
    assert ex.state == S.STREAMING and ex.committed and ex.status == 200
    ex.local_body_sent(4)
    ex.local_body_sent(6)
    assert ex.sent == 10 == ex.static_length
    ex.finish_local(True)
    assert ex.state == S.DONE and take(ex) == ([], [], [(X.A_FINISH, False)])
    with pytest.raises(ExchangeError, match="DONE -> STREAMING"):
        ex.served_locally(200, 1)


def test_finish_local_without_keep_closes() -> None:
    ex = Exchange(settings(), request(), client_ip="c", peer="c")
    ex.served_locally(404, 0)
    ex.finish_local(False)
    assert take(ex)[2] == [(X.A_FINISH, True)]


# -- the guard's verdict as an event (start(banned=)) -----------------------------------------


def test_banned_address_without_token_is_refused_at_start() -> None:
    st = settings(guard=True, ban_status=429)
    ex = Exchange(st, request(headers=[]), client_ip="c", peer="c")
    ex.start(0.0, buffer_body=False, banned=7.2)
    _, _, actions = take(ex)
    assert actions == [(X.A_LOCAL, (429, b"Retry-After: 8\r\n", False))]
    assert ex.state == S.DONE and ex.addrs == []


def test_banned_address_with_token_asks_the_guard() -> None:
    st = settings(guard=True)
    for known, want in ((True, S.CONNECTING), (False, S.DONE)):
        ex = Exchange(st, request(headers=[(b"Token", b"abc")]), client_ip="c", peer="c")
        ex.start(0.0, buffer_body=False, banned=2.0)
        assert take(ex)[2] == [(X.A_ASK_SESSION, "abc")] and ex.state == S.GUARD
        ex.guard_session(known, 0.5)
        _, _, actions = take(ex)
        assert ex.state == want
        if known:
            assert kinds(actions) == [X.A_CONNECT] and ex.banned is None
        else:
            assert actions == [(X.A_LOCAL, (429, b"Retry-After: 2\r\n", False))]


def test_banned_request_token_is_refused_even_with_a_token() -> None:
    """A join is a PIN guess whatever it carries."""
    st = settings(guard=True)
    ex = Exchange(st, request(b"POST", PIN, headers=[(b"Token", b"abc")]), client_ip="c", peer="c")
    ex.start(0.0, buffer_body=False, banned=1.0)
    assert kinds(take(ex)[2]) == [X.A_LOCAL] and ex.state == S.DONE


def test_not_banned_is_the_default() -> None:
    ex = start(request(headers=[(b"Token", b"abc")]), settings(guard=True))
    assert ex.banned is None and ex.state == S.CONNECTING
    connect(ex)
