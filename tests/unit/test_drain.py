"""The drain's state machine (confedge/drain.py), in simulated time."""

from __future__ import annotations

from confedge.drain import Drain, DrainAction, Phase


def test_grace_is_served_in_full_then_listeners_close_then_exit_when_empty() -> None:
    d = Drain(grace=30, timeout=3600)
    assert d.tick(0, 0) is DrainAction.NONE  # not draining: nothing to do
    assert d.start(100)
    assert not d.start(101)  # a second SIGUSR1 changes nothing
    assert d.tick(110, 0) is DrainAction.NONE  # nothing left, but the grace is not over
    assert d.phase is Phase.DRAINING
    assert d.remaining(110) == {"grace_left": 20, "deadline_left": 3590}
    assert d.tick(130, 5) is DrainAction.CLOSE_LISTENERS
    assert d.phase.value == "closing"
    assert d.tick(200, 2) is DrainAction.NONE
    assert d.tick(201, 0) is DrainAction.EXIT
    assert d.phase.value == "drained"
    assert not d.cancel()  # too late: the process exits


def test_deadline_ends_the_drain_with_calls_left() -> None:
    d = Drain(grace=10, timeout=60)
    d.start(0)
    assert d.tick(10, 3) is DrainAction.CLOSE_LISTENERS
    assert d.tick(59.9, 3) is DrainAction.NONE
    assert d.tick(60, 3) is DrainAction.EXIT


def test_cancel_returns_to_serving_and_a_new_drain_starts_afresh() -> None:
    d = Drain(grace=10, timeout=60)
    d.start(0)
    d.tick(10, 1)
    assert d.cancel()
    assert d.phase is Phase.SERVING
    assert d.tick(100, 0) is DrainAction.NONE
    assert d.start(200)
    assert d.tick(205, 0) is DrainAction.NONE  # the grace counts from the new start
    assert d.tick(210, 0) is DrainAction.CLOSE_LISTENERS
