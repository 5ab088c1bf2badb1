"""PIN guesses in flight, through the real HTTPS proxy against a recording node (issue 11).

A PIN attack with 200 parallel connections from one address, in one worker and in two worker
processes, and through two instances sharing Redis: the node must see at most `maxretry` wrong
PINs. The in-flight limits per address and per conference, measured at the node. And a banned
address whose admitted participant still refreshes, leaves and hangs up, while its new
request_token is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from guard_upstream import PinNode
from test_guard_proxy import TOKEN, _raw, _ssl, attempt, config, send, two_instances

from confedge.guard import create_guard
from confedge.proxy.service import ProxyService

ATTACKER = "127.0.4.1"
CONF = "/api/client/v2/conferences/meet/"


# Health checks that tolerate a busy test process: the node shares the test's event loop with
# 200 client TLS handshakes, and a status check kept waiting there must not take the node out
# of service in the middle of the attack.
CALM = 30.0


@pytest.fixture
async def node() -> Any:
    n = await PinNode().start()
    yield n
    await n.stop()


async def _attack(ports: list[int], n: int, source: str) -> list[int]:
    """n guesses at once, each on its own connection (spread over `ports`)."""
    ctx = _ssl()  # one for all n (see send)
    results = await asyncio.gather(
        *(send(ports[i % len(ports)], [_raw(TOKEN, f"{i:04d}")], source, ctx) for i in range(n))
    )
    return [r[0][0] if r else 0 for r in results]


async def _assert_bounded(node: PinNode, statuses: list[int], maxretry: int) -> None:
    wrong = node.wrong_pins_from(ATTACKER)
    assert wrong <= maxretry, f"{wrong} wrong PINs reached the node (maxretry {maxretry})"
    assert wrong >= 1  # the attack did reach the node: the bound is not a blanket refusal
    assert set(statuses) <= {403, 429}, statuses
    assert statuses.count(403) == wrong  # every answer the attacker read was a counted one


async def test_200_parallel_connections_get_at_most_maxretry_wrong_pins(
    node: PinNode, tmp_path: Path
) -> None:
    node.delay = 0.05  # the node takes its time: answers come back while others are in flight
    svc = ProxyService(
        config(node, tmp_path, maxretry=10, bantime=60, health_interval=CALM),
        guard_factory=create_guard,
    )
    await svc.start()
    try:
        statuses = await _attack([svc.https_port], 200, ATTACKER)
        await _assert_bounded(node, statuses, 10)
        # Further waves (the in-flight limit may have refused much of the first) take the
        # total to maxretry and no further: the address ends banned.
        for _ in range(4):
            statuses += await _attack([svc.https_port], 25, ATTACKER)
            await _assert_bounded(node, statuses, 10)
        assert node.wrong_pins_from(ATTACKER) == 10
        assert await attempt(svc.https_port, "1234", source=ATTACKER) == 429
    finally:
        await svc.close()


async def test_two_worker_processes_share_the_count(node: PinNode, tmp_path: Path) -> None:
    node.delay = 0.05
    svc = ProxyService(
        config(node, tmp_path, workers=2, maxretry=10, bantime=60, health_interval=CALM),
        guard_factory=create_guard,
    )
    await svc.start()
    try:
        statuses = await _attack([svc.https_port], 200, ATTACKER)
        await _assert_bounded(node, statuses, 10)
    finally:
        await svc.close()


@pytest.mark.slow
async def test_two_instances_share_the_count_through_redis(node: PinNode, tmp_path: Path) -> None:
    node.delay = 0.05
    async with two_instances(node, tmp_path, maxretry=10, bantime=60, health_interval=CALM) as (
        a,
        b,
    ):
        statuses = await _attack([a.https_port, b.https_port], 200, ATTACKER)
        await _assert_bounded(node, statuses, 10)


async def test_in_flight_limits_per_address_and_per_conference(
    node: PinNode, tmp_path: Path
) -> None:
    node.delay = 0.4
    cfg = config(
        node,
        tmp_path,
        maxretry=100,
        health_interval=CALM,
        inflight_per_address=2,
        inflight_per_conference=3,
    )
    svc = ProxyService(cfg, guard_factory=create_guard)
    await svc.start()
    port = svc.https_port
    try:
        # Right PINs (no failures at all): only the in-flight limit holds them back.
        one = await asyncio.gather(*(send(port, [_raw(TOKEN, "1234")], ATTACKER) for _ in range(8)))
        statuses = [r[0][0] for r in one]
        assert statuses.count(200) >= 2 and set(statuses) <= {200, 429}, statuses
        refused = [r[0][1] for r in one if r[0][0] == 429]
        assert refused and all(int(h["retry-after"]) >= 1 for h in refused)
        assert node.max_busy[f"ip:{ATTACKER}"] <= 2
        # Eight addresses at once on one conference: at most three reach it together.
        many = await asyncio.gather(
            *(send(port, [_raw(TOKEN, "1234")], f"127.0.5.{i + 1}") for i in range(8))
        )
        statuses = [r[0][0] for r in many]
        assert statuses.count(200) >= 3 and set(statuses) <= {200, 429}, statuses
        assert node.max_busy["conf:meet"] <= 3
        # Once the answers are in, the slots are free again.
        assert await attempt(port, "1234", source=ATTACKER) == 200
    finally:
        await svc.close()


async def _call(port: int, path: str, token: str | None = None, *, query: bool = False) -> Any:
    extra = ""
    target = CONF + path
    if token is not None and query:
        target += f"?token={token}"
    elif token is not None:
        extra = f"token: {token}\r\n"
    (r,) = await send(port, [_raw(target, None, extra=extra)], ATTACKER)
    return r


async def test_banned_address_admitted_participant_can_still_leave(
    node: PinNode, tmp_path: Path
) -> None:
    """Two workers: the token is issued through one and used through either (shared store)."""
    svc = ProxyService(
        config(node, tmp_path, workers=2, maxretry=4, bantime=60), guard_factory=create_guard
    )
    await svc.start()
    port = svc.https_port
    try:
        # A participant behind this address joins and refreshes its token.
        (joined,) = await send(port, [_raw(TOKEN, "1234")], ATTACKER)
        assert joined[0] == 200
        first = json.loads(joined[2])["result"]["token"]
        refreshed = await _call(port, "refresh_token", first)
        assert refreshed[0] == 200
        token = json.loads(refreshed[2])["result"]["token"]
        # Someone else behind the same address guesses and gets it banned.
        for i in range(4):
            assert await attempt(port, f"000{i}", source=ATTACKER) == 403
        t0 = time.monotonic()
        while await attempt(port, "1234", source=ATTACKER) != 429:  # a worker may lag ~0.5 s
            assert time.monotonic() - t0 < 2.0, "the ban did not reach every worker"
        assert {s for s in [await attempt(port, "1234", source=ATTACKER) for _ in range(6)]} == {
            429
        }
        reached = len(node.attempts)
        # request_token stays refused even with a valid token: a new join is a guess.
        (r,) = await send(port, [_raw(TOKEN, "1234", extra=f"token: {token}\r\n")], ATTACKER)
        assert r[0] == 429
        # A made-up token, or none, is refused as before -- once each worker's own ban table
        # has the ban: PIN guesses above were refused through the shared store at once, but a
        # token call is judged by the worker's table, which lags by up to ~0.5 s (with fast
        # requests a made-up token reached the node in that window). Eight refusals in a row
        # (each connection lands on either worker) say both have it.
        t0, streak = time.monotonic(), 0
        while streak < 8:
            assert time.monotonic() - t0 < 2.0, "the ban did not reach every worker's table"
            streak = streak + 1 if (await _call(port, "release_token", "f" * 32))[0] == 429 else 0
        calls = len(node.calls)
        assert (await _call(port, "release_token", "f" * 32))[0] == 429
        assert (await _call(port, "release_token"))[0] == 429
        assert len(node.attempts) == reached and len(node.calls) == calls
        # The admitted participant's calls reach the node: header and query forms, several
        # times (either worker).
        for _ in range(3):
            hung_up = await _call(port, "participants/p1/disconnect", token, query=True)
            assert hung_up[0] == 200
        left = await _call(port, "release_token", token)
        assert left[0] == 200
        assert [c[1:] for c in node.calls[-4:]] == [("disconnect", "ok")] * 3 + [
            ("release_token", "ok")
        ]
        # The superseded token was remembered too (it still passes the proxy; the node
        # decides): what matters is that it is not a guess.
        assert (await _call(port, "release_token", first))[0] == 403
        assert node.calls[-1][1:] == ("release_token", "invalid")
    finally:
        await svc.close()
