"""PIN guesses in flight in simulated time: the admission rule, reservations that settle or
lapse, shared by two guards (workers) over one store, the outage fallback, and remembered
sessions."""

from __future__ import annotations

import asyncio

import pytest
from test_guard_service import T0, Clock

from confedge.config import ConfigError, GuardConfig, parse_config, parse_section
from confedge.guard import Guard
from confedge.guard.inflight import (
    Admission,
    InFlight,
    Limits,
    Reservation,
    admit,
    counted,
    issued_token,
    session_token,
    token_call,
)
from confedge.guard.store import MemoryStore

LIM = Limits(maxretry=10, findtime=300, per_address=1000, per_conference=1000)


def gcfg(**kw: object) -> GuardConfig:
    base: dict[str, object] = {
        "enabled": True,
        "jitter": 0.0,
        "ignore": [],
        "bantime": 60,
        "inflight_per_address": 1000,
        "inflight_per_conference": 1000,
    }
    base.update(kw)
    return parse_section(GuardConfig, base)


async def guards(store: MemoryStore, clock: Clock, n: int = 2, **kw: object) -> list[Guard]:
    out = [Guard(gcfg(**kw), store, clock=clock) for _ in range(n)]
    for g in out:
        await g._connect()
    return out


async def reserve(g: Guard, ip: str, alias: str = "meet", ttl: float = 140.0) -> str | None:
    """reserve_pin as a coroutine: the ticket, or None when refused."""
    fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    g.reserve_pin(ip, alias, ttl, lambda ticket, _retry: fut.set_result(ticket))
    return await fut


async def settled(*gs: Guard) -> None:
    for g in gs:
        if g._tasks:
            await asyncio.wait(set(g._tasks))


# -- the rule ------------------------------------------------------------------------------------


def test_admit_counts_failures_and_reservations_against_maxretry() -> None:
    assert admit(LIM, T0, [T0 - 1] * 5, 4, 4) is None  # 5 + 4 + 1 = 10
    assert admit(LIM, T0, [T0 - 1] * 5, 5, 5) == Admission("failures", 1.0)  # answers pending
    assert admit(LIM, T0, [], 9, 9) is None
    assert admit(LIM, T0, [], 10, 10) == Admission("failures", 1.0)


def test_admit_retry_after_is_when_the_oldest_needed_failure_leaves_the_window() -> None:
    fails = [T0 - 200, T0 - 100] + [T0 - 10] * 8
    verdict = admit(LIM, T0, fails, 0, 0)
    assert verdict == Admission("failures", 100.0)  # T0 - 200 + 300
    verdict = admit(LIM, T0, [T0 - 299.9] + [T0] * 9, 0, 0)
    assert verdict is not None and verdict.retry_after == 1.0  # never below 1 s


def test_admit_in_flight_limits_per_address_and_conference() -> None:
    lim = Limits(maxretry=10, findtime=300, per_address=2, per_conference=3)
    assert admit(lim, T0, [], 1, 2) is None
    assert admit(lim, T0, [], 2, 0) == Admission("address", 1.0)
    assert admit(lim, T0, [], 0, 3) == Admission("conference", 1.0)


def test_counted_distinct_pins_counts_each_pin_once_at_its_first_time() -> None:
    rows = [(T0 + 2, "a"), (T0 + 1, "b"), (T0, "a")]
    assert counted(rows, distinct=False) == [T0, T0 + 1, T0 + 2]
    assert counted(rows, distinct=True) == [T0, T0 + 1]


def test_counted_distinct_pins_counts_each_failure_without_a_pin() -> None:
    """A failure whose PIN the guard did not see ("": the node read it from the body) counts
    each time, as GuardCore.observe and the Redis store count it (was: all folded into one)."""
    rows = [(T0, ""), (T0 + 1, "a"), (T0 + 2, ""), (T0 + 3, ""), (T0 + 4, "a")]
    assert counted(rows, distinct=True) == [T0, T0 + 1, T0 + 2, T0 + 3]


# -- reservations ----------------------------------------------------------------------------


def res(
    i: int, ip: str = "198.51.100.1", alias: str = "meet", exp: float = T0 + 140
) -> Reservation:
    return Reservation(f"r{i}", ip, alias, exp)


def test_two_hundred_at_once_admit_exactly_maxretry() -> None:
    table = InFlight()
    verdicts = [table.reserve(LIM, T0, res(i), []) for i in range(200)]
    assert sum(v is None for v in verdicts) == 10
    assert len(table) == 10
    # Another address and conference are not affected.
    assert table.reserve(LIM, T0, res(999, ip="198.51.100.2"), []) is None


def test_release_frees_a_slot_and_unknown_ids_are_fine() -> None:
    table = InFlight()
    for i in range(10):
        assert table.reserve(LIM, T0, res(i), []) is None
    assert table.reserve(LIM, T0, res(10), []) is not None
    assert table.release("r3") is not None
    assert table.release("r3") is None
    assert table.release("never") is None
    assert table.reserve(LIM, T0, res(11), []) is None
    assert table.counts("198.51.100.1", "meet", T0) == (10, 10)


def test_unanswered_reservations_lapse_at_their_expiry_not_before() -> None:
    table = InFlight()
    for i in range(10):
        assert table.reserve(LIM, T0, res(i, exp=T0 + 140), []) is None
    assert table.reserve(LIM, T0 + 139.9, res(10), []) is not None
    assert table.counts("198.51.100.1", "meet", T0 + 140) == (0, 0)
    assert table.reserve(LIM, T0 + 140, res(11, exp=T0 + 280), []) is None


def test_sessions_are_bound_to_the_address_and_expire() -> None:
    table = InFlight()
    table.remember("k", "198.51.100.1", T0 + 120)
    assert table.known("k", "198.51.100.1", T0 + 119)
    assert not table.known("k", "198.51.100.9", T0 + 1)
    assert not table.known("other", "198.51.100.1", T0 + 1)
    assert not table.known("k", "198.51.100.1", T0 + 120)
    table.remember("k2", "198.51.100.1", T0 + 10)
    table.purge(T0 + 10)
    assert not table.known("k2", "198.51.100.1", T0)


# -- the guard over a shared store (two workers) ------------------------------------------------


async def test_two_workers_share_reservations_and_failures() -> None:
    clock = Clock()
    store = MemoryStore()
    g1, g2 = await guards(store, clock)
    ip = "198.51.100.7"
    tickets = await asyncio.gather(*(reserve((g1, g2)[i % 2], ip) for i in range(200)))
    granted = [(i, t) for i, t in enumerate(tickets) if t is not None]
    assert len(granted) == 10
    # Every admitted guess is answered "Invalid PIN" by the node.
    for i, t in granted:
        assert t is not None
        (g1, g2)[i % 2].settle_pin(t, ip, "meet", f"{i:04d}", failed=True)
    await settled(g1, g2)
    assert len(store.inflight) == 0
    assert sum(1 for _, f in store.failures if f.ip == ip) == 10
    # Each worker learns the other's five failures at its next poll: the tenth bans.
    clock.now += 1
    for g in (g1, g2, g1):
        await g.sync()
    assert g1.check(ip) is not None and g2.check(ip) is not None
    assert await reserve(g1, ip) is None and await reserve(g2, ip) is None


async def test_answers_other_than_invalid_pin_release_the_slot() -> None:
    clock = Clock()
    store = MemoryStore()
    (g,) = await guards(store, clock, n=1, maxretry=3)
    ip = "198.51.100.8"
    for _ in range(5):  # far more joins than maxretry: none is a failure
        tickets = [await reserve(g, ip) for _ in range(3)]
        assert None not in tickets and await reserve(g, ip) is None
        for t in tickets:
            assert t is not None
            g.settle_pin(t, ip, "meet", "1234", failed=False)
        await settled(g)
    assert store.failures == [] and g.check(ip) is None


async def test_a_worker_that_never_answers_holds_slots_until_they_lapse() -> None:
    clock = Clock()
    store = MemoryStore()
    crashed, alive = await guards(store, clock, maxretry=3)
    ip = "198.51.100.9"
    for _ in range(3):
        assert await reserve(crashed, ip, ttl=140) is not None  # never settled
    clock.now = T0 + 139
    assert await reserve(alive, ip) is None
    clock.now = T0 + 140
    t = await reserve(alive, ip)
    assert t is not None
    alive.settle_pin(t, ip, "meet", "0000", failed=True)
    await settled(alive)
    assert sum(1 for _, f in store.failures if f.ip == ip) == 1


async def test_retry_after_of_a_refusal() -> None:
    clock = Clock()
    store = MemoryStore()
    (g,) = await guards(store, clock, n=1, maxretry=2, inflight_per_address=1)
    ip = "198.51.100.10"
    answers: list[tuple[str | None, float]] = []
    t = await reserve(g, ip)
    g.reserve_pin(ip, "meet", 140, lambda ticket, retry: answers.append((ticket, retry)))
    await settled(g)
    assert answers == [(None, 1.0)]  # the address's one in-flight slot is taken
    assert t is not None


async def test_lifting_a_ban_lets_the_address_try_again() -> None:
    clock = Clock()
    store = MemoryStore()
    (g,) = await guards(store, clock, n=1, maxretry=2, bantime=600)
    ip = "198.51.100.11"
    for pin in ("1", "2"):
        t = await reserve(g, ip)
        assert t is not None
        g.settle_pin(t, ip, "meet", pin, failed=True)
    await settled(g)
    await g.sync()
    assert g.check(ip) is not None and await reserve(g, ip) is None
    await store.remove(ip)  # `confedge bans remove`
    clock.now += 1
    await g.sync()
    assert g.check(ip) is None and await reserve(g, ip) is not None


async def test_store_outage_falls_back_to_this_workers_counts() -> None:
    clock = Clock()
    store = MemoryStore()
    (g,) = await guards(store, clock, n=1, maxretry=3)
    ip = "198.51.100.12"
    store.down = True
    tickets = [await reserve(g, ip) for _ in range(3)]
    assert None not in tickets and await reserve(g, ip) is None
    for t in tickets[:2]:
        assert t is not None
        g.settle_pin(t, ip, "meet", "0000", failed=True)
    await settled(g)
    assert await reserve(g, ip) is None  # 2 failures + 1 in flight
    store.down = False
    await g.sync()  # the failures kept meanwhile reach the store
    assert sum(1 for _, f in store.failures if f.ip == ip) == 2


async def test_ignored_addresses_are_never_limited() -> None:
    clock = Clock()
    (g,) = await guards(MemoryStore(), clock, n=1, maxretry=1, ignore=["192.0.2.0/24"])
    assert all([await reserve(g, "192.0.2.5") == "" for _ in range(5)])


async def test_sessions_are_shared_by_workers_bound_to_the_address_and_expire() -> None:
    clock = Clock()
    store = MemoryStore()
    g1, g2 = await guards(store, clock)

    async def known(g: Guard, ip: str, token: str) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        g.session_known(ip, token, fut.set_result)
        return await fut

    g1.remember_session("198.51.100.20", "tok-1", 120.0)
    await settled(g1)
    assert await known(g2, "198.51.100.20", "tok-1")
    assert not await known(g2, "198.51.100.21", "tok-1")
    assert not await known(g2, "198.51.100.20", "tok-2")
    clock.now = T0 + 120
    assert not await known(g1, "198.51.100.20", "tok-1")
    assert not any("tok-1" in k for k in store.inflight._sessions)  # only salted hashes


# -- what the proxy hands over --------------------------------------------------------------------


def test_token_call_session_token_and_issued_token() -> None:
    assert token_call("/api/client/v2/conferences/meet/request_token") == "request_token"
    assert token_call("/api/client/v2/conferences/m%65et/REFRESH_TOKEN/") == "refresh_token"
    assert token_call("/api/client/v2/conferences/meet/release_token") is None
    assert session_token([(b"token", b"Token", b" abc ")], b"/x?token=q") == "abc"
    assert session_token([], b"/x?a=1&token=q%2B") == "q+"
    assert session_token([], b"/x?token=") is None
    assert issued_token(b'{"result": {"token": "t", "expires": "120"}}') == ("t", 120.0)
    assert issued_token(b'{"result": {"token": "t", "expires": "1e9"}}') == ("t", 3600.0)
    assert issued_token(b'{"result": {"token": "t", "expires": "nan"}}') == ("t", 120.0)
    # A JSON integer too large for a float (OverflowError, not ValueError: was uncaught, and
    # the client got no answer at all)
    huge = b'{"result": {"token": "t", "expires": 1' + b"0" * 400 + b"}}"
    assert issued_token(huge) == ("t", 120.0)
    assert issued_token(b'{"result": "Invalid PIN"}') is None
    assert issued_token(b"\x1f\x8b not json") is None


def test_memory_store_with_several_workers_is_refused() -> None:
    """Each worker process would count alone: maxretry guesses per worker."""

    def cfg(workers: int, proxy: bool = True) -> object:
        return parse_config(
            {
                "turn": {"enabled": False},
                "proxy": {"enabled": proxy, "nodes": ["10.0.0.11"], "workers": workers},
                "guard": {"enabled": True, "store": "memory"},
            }
        )

    for workers in (0, 2):
        with pytest.raises(ConfigError) as err:
            cfg(workers)
        msg = str(err.value)
        assert "guard.store" in msg and f"proxy.workers = {workers}" in msg and "sqlite" in msg
    cfg(1)
    cfg(2, proxy=False)
