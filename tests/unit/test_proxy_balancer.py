"""Balancing and health state machines (sans-I/O, injected time)."""

from __future__ import annotations

from collections import Counter

import pytest

from confedge.proxy.balancer import Balancer
from confedge.proxy.health import HealthMonitor, NodeState


def make(policy: str, n: int = 3) -> tuple[Balancer, HealthMonitor]:
    h = HealthMonitor(n, rise=2, fall=2)
    keys = [f"10.0.0.{i}:443" for i in range(n)]
    return Balancer(keys, h.up, policy, h.serving), h  # type: ignore[arg-type]


def test_round_robin_skips_down_and_tried() -> None:
    b, h = make("round-robin")
    assert [b.pick("c", 0) for _ in range(4)] == [0, 1, 2, 0]
    h.passive_failure(1, 0.0, "connect error")
    assert [b.pick("c", 0) for _ in range(4)] == [2, 0, 2, 0]
    assert b.pick("c", 0b101) is None  # 0 and 2 tried, 1 down
    assert b.pick("c", 0b001) == 2


def test_ip_hash_sticky_and_minimal_movement() -> None:
    b, h = make("ip-hash", 4)
    clients = [f"203.0.113.{i}" for i in range(200)]
    first = {c: b.pick(c, 0) for c in clients}
    assert set(Counter(first.values())) == {0, 1, 2, 3}
    assert {c: b.pick(c, 0) for c in clients} == first
    h.passive_failure(2, 0.0, "down")
    after = {c: b.pick(c, 0) for c in clients}
    for c in clients:
        if first[c] != 2:
            assert after[c] == first[c]
        else:
            assert after[c] != 2
    # a retry for the same client goes to a different node, deterministically
    i = b.pick(clients[0], 0)
    assert i is not None
    assert b.pick(clients[0], 1 << i) not in (i, None)


def test_least_conn() -> None:
    b, _ = make("least-conn")
    b.active[:] = [3, 1, 2]
    assert b.pick("c", 0) == 1
    b.active[:] = [0, 0, 0]
    assert {b.pick("c", 0) for _ in range(3)} == {0, 1, 2}  # ties rotate


def test_health_fall_rise_and_maintenance() -> None:
    h = HealthMonitor(1, rise=2, fall=2)
    assert h.check_result(0, "fail", 1.0, "refused") is None
    t = h.check_result(0, "fail", 2.0, "refused")
    assert t is not None and t.new is NodeState.DOWN and not h.up[0]
    assert h.check_result(0, "ok", 3.0) is None
    t = h.check_result(0, "ok", 4.0)
    assert t is not None and t.new is NodeState.UP and h.up[0]
    t = h.check_result(0, "maintenance", 5.0)
    assert t is not None and t.new is NodeState.MAINTENANCE and not h.up[0]
    assert h.passive_failure(0, 6.0, "502") is None  # maintenance is not overridden by a 502
    h.check_result(0, "ok", 7.0)
    assert h.check_result(0, "ok", 8.0) is not None and h.up[0]
    t = h.passive_failure(0, 9.0, "connect error")
    assert t is not None and t.new is NodeState.DOWN and t.at == 9.0


def test_health_ok_streak_resets_on_failure() -> None:
    h = HealthMonitor(1, rise=3, fall=1)
    h.check_result(0, "fail", 0.0)
    h.check_result(0, "ok", 1.0)
    h.check_result(0, "ok", 2.0)
    h.check_result(0, "fail", 3.0)
    h.check_result(0, "ok", 4.0)
    h.check_result(0, "ok", 5.0)
    assert h.states[0] is NodeState.DOWN
    assert h.check_result(0, "ok", 6.0) is not None


def test_pick_serving_includes_maintenance_not_down() -> None:
    """New requests skip a node in maintenance; a refused token-bearing request may look there."""
    b, h = make("round-robin", 3)
    h.check_result(1, "maintenance", 1.0)
    assert 1 not in {b.pick("c", 0) for _ in range(6)}
    assert b.pick_serving("c", 0b101) == 1  # 0 and 2 already refused the token
    h.check_result(1, "fail", 2.0, "connection refused")
    assert h.states[1] is NodeState.DOWN
    assert b.pick_serving("c", 0b101) is None


def test_an_unknown_policy_is_refused_not_replaced() -> None:
    """A typo in a caller ("round_robin") used to fall through to least-conn silently."""
    with pytest.raises(ValueError, match="unknown balancing policy 'round_robin'"):
        Balancer(["a", "b"], [True, True], "round_robin")  # type: ignore[arg-type]
