"""The stores' atomic admission (guard/inflight.py) on real SQLite files and a real Redis:
two workers' stores asking at once never admit more than maxretry, a settled failure counts,
a lapsed reservation frees its slot, a ban refuses, sessions are remembered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from guard_redis import redis_server

from confedge.guard.core import BanRecord, Failure
from confedge.guard.inflight import Limits, Reservation
from confedge.guard.redis_store import RedisStore
from confedge.guard.sqlite_store import SQLiteStore
from confedge.guard.store import GuardStore

T0 = 1_700_000_000.0
LIM = Limits(maxretry=10, findtime=300, per_address=1000, per_conference=1000)
IP = "198.51.100.30"


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[GuardStore]]:
    """Two stores over one backing store, as two worker processes (or instances) hold them."""
    if request.param == "sqlite":
        pair: list[GuardStore] = [SQLiteStore(tmp_path / "guard.sqlite3") for _ in range(2)]
        for s in pair:
            await s.open()
        yield pair
        for s in pair:
            await s.close()
        return
    with redis_server() as srv:
        pair = [RedisStore(srv.url) for _ in range(2)]
        for s in pair:
            await s.open()
        yield pair
        for s in pair:
            await s.close()


def res(i: int, exp: float = T0 + 140) -> Reservation:
    return Reservation(f"r{i}", IP, "meet", exp)


async def test_concurrent_reservations_admit_exactly_maxretry(stores: list[GuardStore]) -> None:
    verdicts = await asyncio.gather(*(stores[i % 2].reserve(res(i), LIM, T0) for i in range(100)))
    admitted = [i for i, v in enumerate(verdicts) if v is None]
    assert len(admitted) == 10
    # Settling: two failures and eight other answers leave eight slots.
    for n, i in enumerate(admitted):
        f = Failure(T0 + 1, "pin", IP, "meet", f"h{n}", "w") if n < 2 else None
        await stores[n % 2].settle(res(i), f)
    verdicts = await asyncio.gather(
        *(stores[i % 2].reserve(res(200 + i), LIM, T0 + 2) for i in range(20))
    )
    assert sum(v is None for v in verdicts) == 8
    refused = [v for v in verdicts if v is not None]
    assert {v.reason for v in refused} == {"failures"} and {v.retry_after for v in refused} == {1.0}
    # The settled failures are in the log every worker polls.
    poll = await stores[1].poll(None, T0, None)
    assert sorted(f.pin for f in poll.failures) == ["h0", "h1"]


async def test_lapsed_reservations_free_their_slots(stores: list[GuardStore]) -> None:
    for i in range(10):
        assert await stores[0].reserve(res(i, exp=T0 + 140), LIM, T0) is None
    assert await stores[1].reserve(res(10), LIM, T0 + 139) is not None
    assert await stores[1].reserve(res(11, exp=T0 + 280), LIM, T0 + 140) is None


async def test_a_ban_refuses_and_pays_for_earlier_failures(stores: list[GuardStore]) -> None:
    fails = [Failure(T0 + i, "pin", IP, "meet", f"h{i}", "w") for i in range(9)]
    ban = BanRecord(IP, T0 + 10, T0 + 70, 1, 9, "test")
    await stores[0].push(fails, [ban])
    verdict = await stores[1].reserve(res(0), LIM, T0 + 20)
    assert verdict is not None and verdict.reason == "banned" and verdict.retry_after == 50
    # After the ban the nine failures are paid for: the address starts afresh.
    for i in range(10):
        assert await stores[i % 2].reserve(res(i), LIM, T0 + 71) is None


async def test_sessions_are_remembered_per_address(stores: list[GuardStore]) -> None:
    await stores[0].remember_session("k1", IP, T0 + 120, T0)
    assert await stores[1].session_known("k1", IP, T0 + 1)
    assert not await stores[1].session_known("k1", "198.51.100.31", T0 + 1)
    assert not await stores[1].session_known("k2", IP, T0 + 1)
    assert not await stores[1].session_known("k1", IP, T0 + 120)
