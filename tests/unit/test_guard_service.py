"""The guard adapter over a shared in-memory store, in simulated time: cross-worker counting,
ban propagation, exactly-once audit lines, and store outages."""

from __future__ import annotations

import asyncio
import logging

import pytest

from confedge.config import GuardConfig, parse_config, parse_section
from confedge.guard import Guard, NullGuard, create_guard
from confedge.guard.store import MemoryStore

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def gcfg(**kw: object) -> GuardConfig:
    base: dict[str, object] = {"enabled": True, "jitter": 0.0, "ignore": [], "bantime": 60}
    base.update(kw)
    return parse_section(GuardConfig, base)


async def pair(store: MemoryStore, clock: Clock, **kw: object) -> tuple[Guard, Guard]:
    g1 = Guard(gcfg(**kw), store, clock=clock)
    g2 = Guard(gcfg(**kw), store, clock=clock)
    for g in (g1, g2):
        await g._connect()
    return g1, g2


def audit_lines(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "confedge.guard.audit" and r.getMessage().startswith(word + " ")
    ]


async def test_counts_across_workers_and_propagates_ban(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard")
    store, clock = MemoryStore(), Clock()
    g1, g2 = await pair(store, clock)
    ip = "198.51.100.10"
    for i in range(5):
        g1.record_pin_failure(ip, "Meet", f"pin{i}")
    await g1.sync()
    clock.now += 1
    await g2.sync()  # g2 now knows g1's five failures
    for i in range(4):
        g2.record_pin_failure(ip, "meet", f"pin{5 + i}")
    assert g2.check(ip) is None
    g2.record_pin_failure(ip, "meet", "pin9")
    assert g2.check(ip) == pytest.approx(60)  # in force at once where it was decided
    assert g1.check(ip) is None
    await g2.sync()
    clock.now += 0.3
    await g1.sync()
    assert g1.check(ip) == pytest.approx(59.7)
    lines = audit_lines(caplog, "ban")
    assert len(lines) == 1 and f"source={ip}" in lines[0] and "failures=10" in lines[0]
    assert "pin9" not in caplog.text  # PINs are never logged nor stored
    assert all("pin" not in f.pin for _, f in store.failures)

    # Expiry: both workers notice, exactly one writes the unban line.
    clock.now += 60
    await g1.sync()
    await g2.sync()
    assert g1.check(ip) is None and g2.check(ip) is None
    assert len(audit_lines(caplog, "unban")) == 1


async def test_simultaneous_decisions_make_one_ban(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard.audit")
    store, clock = MemoryStore(), Clock()
    g1, g2 = await pair(store, clock, maxretry=2)
    ip = "198.51.100.11"
    # Both see the same two failures (one each, then sync), then both decide on a third.
    g1.record_pin_failure(ip, "a", "1")
    g2.record_pin_failure(ip, "a", "2")
    await g1.sync()  # pushes its failure
    clock.now += 0.3
    await g2.sync()  # pushes its own, reads g1's: decides
    await g1.sync()  # reads g2's failure: decides too (before seeing g2's ban)
    banned_before = [g.check(ip) is not None for g in (g1, g2)]
    assert banned_before == [True, True]  # each decided on the other's failure
    await g1.sync()
    await g2.sync()
    assert len(audit_lines(caplog, "ban")) == 1
    assert len(store.bans) == 1


async def test_operator_removal_reaches_workers() -> None:
    store, clock = MemoryStore(), Clock()
    g1, g2 = await pair(store, clock, maxretry=1)
    g1.record_pin_failure("198.51.100.12", "a", "1")
    await g1.sync()
    clock.now += 0.3
    await g2.sync()
    assert g2.check("198.51.100.12") is not None
    await store.remove("198.51.100.12")
    clock.now += 0.3
    await g1.sync()
    await g2.sync()
    assert g1.check("198.51.100.12") is None and g2.check("198.51.100.12") is None


async def test_turn_failures_and_ignore(caplog: pytest.LogCaptureFixture) -> None:
    store, clock = MemoryStore(), Clock()
    g = Guard(gcfg(turn_maxretry=3, ignore=["192.0.2.0/24"]), store, clock=clock)
    await g._connect()
    for _ in range(10):
        g.record_turn_auth_failure("192.0.2.5")
    assert g.check("192.0.2.5") is None
    for _ in range(3):
        g.record_turn_auth_failure("::ffff:198.51.100.13")
    assert g.check("198.51.100.13") is not None
    assert g.check("::ffff:198.51.100.13") is not None
    g.record_turn_auth_failure("not an address")  # ignored, no crash
    await g.sync()
    assert [b.reason for b in await store.list_bans()] == ["turn: 3 wrong credentials"]


async def test_store_down_works_locally_logs_once_and_catches_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard")
    store, clock = MemoryStore(), Clock()
    g1, g2 = await pair(store, clock, maxretry=3)
    store.down = True
    for _ in range(3):
        g1.record_pin_failure("198.51.100.14", "a", "x")
    assert g1.check("198.51.100.14") is not None
    for _ in range(5):
        clock.now += 0.3
        await g1.sync()
    warnings = [
        r for r in caplog.records if r.name == "confedge.guard" and "unreachable" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert len(audit_lines(caplog, "ban")) == 1 and "local only" in caplog.text
    assert g1.check("198.51.100.14") is not None
    store.down = False
    clock.now += 0.3
    await g1.sync()
    assert "reachable again" in caplog.text
    await g2.sync()
    assert g2.check("198.51.100.14") is not None
    assert len(audit_lines(caplog, "ban")) == 1  # not logged twice


async def test_start_with_store_down_then_recovers() -> None:
    store, clock = MemoryStore(), Clock()
    store.down = True
    g = Guard(gcfg(refresh_interval=0.05), store, clock=clock)
    await g.start()  # a transient store being down does not stop the start
    assert not g.store_ok
    store.down = False
    await g.sync()
    assert g.store_ok
    await g.close()


async def test_background_task_propagates_within_one_second() -> None:
    store = MemoryStore()
    c = gcfg(maxretry=2, refresh_interval=0.25)
    g1, g2 = Guard(c, store), Guard(c, store)
    await g1.start()
    await g2.start()
    try:
        g1.record_pin_failure("198.51.100.15", "a", "1")
        g1.record_pin_failure("198.51.100.15", "a", "2")
        assert g1.check("198.51.100.15") is not None
        loop = asyncio.get_running_loop()
        t = loop.time()
        while g2.check("198.51.100.15") is None:
            assert loop.time() - t < 1.0, "ban did not reach the other guard within 1 s"
            await asyncio.sleep(0.01)
    finally:
        await g1.close()
        await g2.close()


async def test_factory_and_null_guard() -> None:
    off = parse_config({"proxy": {"enabled": False}, "turn": {"enabled": False}})
    g = create_guard(off)
    assert isinstance(g, NullGuard) and not g.enabled and g.ban_status == 429
    await g.start()
    g.record_pin_failure("192.0.2.1", "a", "1")
    g.record_turn_auth_failure("192.0.2.1")
    assert g.check("192.0.2.1") is None
    await g.close()
    on = parse_config(
        {
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "guard": {"enabled": True, "store": "memory", "ban_status": 403},
        }
    )
    g2 = create_guard(on)
    assert isinstance(g2, Guard) and g2.enabled and g2.ban_status == 403


async def test_reconnect_does_not_count_others_failures_twice() -> None:
    store, clock = MemoryStore(), Clock()
    g1, g2 = await pair(store, clock, maxretry=4)
    ip = "198.51.100.16"
    g1.record_pin_failure(ip, "a", "1")
    g1.record_pin_failure(ip, "a", "2")
    await g1.sync()
    clock.now += 0.3
    await g2.sync()  # g2 counts g1's two failures
    store.down = True
    clock.now += 0.3
    await g2.sync()
    store.down = False
    clock.now += 0.3
    await g2.sync()  # reconnects
    g2.record_pin_failure(ip, "a", "3")
    assert g2.check(ip) is None  # 3 failures, not 5
    g2.record_pin_failure(ip, "a", "4")
    assert g2.check(ip) is not None
