"""Every test here runs with a guard on `Exchange.state` (interpreted build): a write from
anywhere but `Exchange._go` (or the START of `__init__`) fails the test, and every change is
recorded, so the scenarios of all these files prove together that no code path moves an
exchange except through the transition table. The compiled build (mypyc: its native class
cannot be patched) runs the same scenarios without the guard; test_transitions.py's source
check covers it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from confedge.proxy import exchange as X
from confedge.proxy.exchange import TRANSITIONS, Exchange, State

# Whether the guard can be installed: the interpreted module has a plain slot descriptor.
INTERPRETED = X.__file__ is not None and X.__file__.endswith(".py")


class StateWrites:
    """What the guard saw: each change as (exchange id, old state, new state)."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, State, State]] = []

    def of(self, ex: Exchange) -> list[tuple[State, State]]:
        return [(a, b) for i, a, b in self.changes if i == id(ex)]

    def clear(self) -> None:
        self.changes.clear()


@pytest.fixture(autouse=True)
def state_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[StateWrites | None]:
    if not INTERPRETED:
        yield None
        return
    slot: Any = Exchange.__dict__["state"]
    seen = StateWrites()

    def get(ex: Exchange) -> int:
        return int(slot.__get__(ex, Exchange))

    def put(ex: Exchange, new: int) -> None:
        code = sys._getframe(1).f_code
        where = f"{code.co_name} ({code.co_filename}:{sys._getframe(1).f_lineno})"
        assert code.co_filename == X.__file__, f"state written outside the core: {where}"
        if code.co_name == "__init__":
            assert new == X.START, f"an exchange begins in START, not {State(new).name}"
        else:
            assert code.co_name == "_go", f"state written outside _go: {where}"
            old = State(get(ex))
            assert State(new) in TRANSITIONS[old], f"{old.name} -> {State(new).name}"
            seen.changes.append((id(ex), old, State(new)))
        slot.__set__(ex, new)

    monkeypatch.setattr(Exchange, "state", property(get, put))
    yield seen
