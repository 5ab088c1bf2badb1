"""Node pools per path prefix (`[[proxy.pools]]`), over real HTTPS to two sets of recording
nodes: prefix routing, longest match, balancing per pool, failover within a pool and never
into another, a pool with every node down while other paths still work, health per pool, and
the pools' counters on /metrics and the status snapshot."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import uvloop
from proxy_upstream import Upstream, get, proxy_config

from confedge.proxy.health import NodeState
from confedge.proxy.service import ProxyService

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy":DeprecationWarning'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@pytest.fixture
async def sets():
    """Three sets of recording nodes: d0-d1 (proxy.nodes), s0-s1 (/scheduling/), a0-a1
    (/scheduling/api/)."""
    groups = {
        name: [await Upstream(f"{name}{i}").start() for i in range(2)] for name in ("d", "s", "a")
    }
    yield groups
    for ups in groups.values():
        for u in ups:
            await u.kill()


def pools(sets: dict[str, list[Upstream]], **extra: Any) -> list[dict[str, Any]]:
    return [
        {"prefix": "/scheduling/", "nodes": [u.address for u in sets["s"]], **extra},
        {"prefix": "/scheduling/api/", "nodes": [u.address for u in sets["a"]]},
    ]


async def start(sets, tmp_path, *, pool_extra: dict[str, Any] | None = None, **kw) -> ProxyService:
    cfg = proxy_config(
        [u.address for u in sets["d"]], str(tmp_path), pools=pools(sets, **(pool_extra or {})), **kw
    )
    svc = ProxyService(cfg)
    await svc.start()
    return svc


async def nodes_of(port: int, target: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = await get(port, target)
        assert r.status == 200, (target, r.status, r.body[:200])
        assert r.json()["target"] == target
        seen[r.json()["node"]] += 1
    return seen


async def test_prefix_routing_longest_match_and_balancing_per_pool(sets, tmp_path):
    svc = await start(sets, tmp_path, health_interval=30, pool_extra={"balance": "round-robin"})
    try:
        assert await nodes_of(svc.https_port, "/webapp/home", 4) == {"d0": 2, "d1": 2}
        assert await nodes_of(svc.https_port, "/scheduling/addin.html", 4) == {"s0": 2, "s1": 2}
        assert await nodes_of(svc.https_port, "/scheduling/api/v1/meetings?x=1", 4) == {
            "a0": 2,
            "a1": 2,
        }
        # Not under a prefix (no trailing "/" segment, or only in the query): the default pool.
        seen = await nodes_of(svc.https_port, "/scheduling", 2)
        seen += await nodes_of(svc.https_port, "/api/client/v2/x?next=/scheduling/", 2)
        assert set(seen) <= {"d0", "d1"}
        # A spelling that is canonically under the prefix is routed by its canonical form.
        r = await get(svc.https_port, "/scheduling/./%61ddin.html")
        assert r.status == 200 and r.json()["node"] in ("s0", "s1")
        # Nothing crossed: each set saw only its own paths.
        assert all(x.target.startswith("/scheduling/api/") for u in sets["a"] for x in u.requests())
        assert all(
            x.target.startswith("/scheduling/") and not x.target.startswith("/scheduling/api/")
            for u in sets["s"]
            for x in u.requests()
        )
        assert not any(x.target.startswith("/scheduling/") for u in sets["d"] for x in u.requests())
    finally:
        await svc.close()


async def test_failover_within_the_pool_never_into_another(sets, tmp_path):
    svc = await start(sets, tmp_path, health_interval=30)
    try:
        await sets["s"][0].kill()
        sets["d"][0].fail_status = 502
        for _ in range(4):
            r = await get(svc.https_port, "/scheduling/x", method="POST", body=b"payload")
            assert r.status == 200 and r.json()["node"] == "s1"
            r = await get(svc.https_port, "/webapp/x", method="POST", body=b"payload")
            assert r.status == 200 and r.json()["node"] == "d1"
        # Its whole pool failing: 502 from the pool, not an answer from another pool's node.
        sets["s"][1].fail_status = 502
        before = {u.name: len(u.requests()) for ups in sets.values() for u in ups}
        r = await get(svc.https_port, "/scheduling/y")
        assert r.status in (502, 503)
        after = {u.name: len(u.requests()) for ups in sets.values() for u in ups}
        assert {k for k in after if after[k] != before[k]} <= {"s1"}
        idx = {u.name: i for i, u in enumerate(u for g in ("d", "s", "a") for u in sets[g])}
        assert svc.core.health.states[idx["s0"]] is NodeState.DOWN
        assert svc.core.health.states[idx["d1"]] is NodeState.UP
        assert svc.core.health.states[idx["a0"]] is NodeState.UP
    finally:
        await svc.close()


async def test_pool_all_down_gives_retrying_page_other_paths_work(sets, tmp_path):
    svc = await start(sets, tmp_path, health_interval=30)
    try:
        for u in sets["s"]:
            await u.kill()
        r = await get(svc.https_port, "/scheduling/addin.html")
        assert r.status == 502 and r.header("Retry-After") == "5"
        assert b'http-equiv="refresh"' in r.body and b"location.reload" in r.body
        r = await get(svc.https_port, "/scheduling/addin.html")
        assert r.status == 503 and b"location.reload" in r.body  # known down: no attempt
        assert (await get(svc.https_port, "/webapp/")).status == 200
        assert (await get(svc.https_port, "/scheduling/api/v1")).status == 200
    finally:
        await svc.close()


async def wait_state(svc: ProxyService, i: int, state: NodeState) -> None:
    for _ in range(60):
        if svc.core.health.states[i] is state:
            return
        await asyncio.sleep(0.05)
    assert svc.core.health.states[i] is state


async def test_health_per_pool_with_its_own_thresholds(sets, tmp_path):
    # The /scheduling/ pool checks every 0.1 s and falls after 1 failure; the default pool
    # checks every 30 s (so it sees nothing in this test).
    svc = await start(
        sets,
        tmp_path,
        health_interval=30,
        pool_extra={"health_interval": 0.1, "health_fall": 1, "health_rise": 1},
    )
    try:
        idx = {u.name: i for i, u in enumerate(u for g in ("d", "s", "a") for u in sets[g])}
        await asyncio.sleep(0.3)
        checks_d = sum(u.status_checks for u in sets["d"])
        checks_s = sum(u.status_checks for u in sets["s"])
        assert checks_s >= 4 and checks_d <= 2, (checks_s, checks_d)
        sets["s"][1].maintenance = True
        await wait_state(svc, idx["s1"], NodeState.MAINTENANCE)
        assert set(await nodes_of(svc.https_port, "/scheduling/z", 4)) == {"s0"}
        sets["s"][1].maintenance = False
        await wait_state(svc, idx["s1"], NodeState.UP)
    finally:
        await svc.close()


async def test_status_page_and_metrics_count_per_pool(sets, tmp_path):
    """The management listener of a full runtime: one row per pool on /status and status.json,
    one sample per pool in /metrics, nodes labelled with their pool."""
    from admin_support import get as admin_get
    from admin_support import metric, parse_metrics

    from confedge.config import parse_config, to_builtins
    from confedge.runtime import Runtime

    data = to_builtins(
        proxy_config(
            [u.address for u in sets["d"]], str(tmp_path), pools=pools(sets), health_interval=0.1
        )
    )
    data["management"] = {"port": 0, "networks": ["127.0.0.1/32"]}
    data["server"]["internal_address"] = "127.0.0.1"

    rt = Runtime(parse_config(data))
    await rt.start()
    try:
        assert rt.admin is not None and rt.proxy is not None
        port = int(rt.admin.port)
        for target in ("/scheduling/a", "/scheduling/b", "/webapp/"):
            assert (await get(rt.proxy.https_port, target)).status == 200
        for u in sets["a"]:
            await u.kill()
        for _ in range(100):
            j = (await admin_get(port, "/status.json")).json()
            rows = {q["pool"]: q for q in j["proxy"]["pools"]}
            if rows["/scheduling/api/"]["nodes_up"] == 0:
                break
            await asyncio.sleep(0.05)
        assert rows["default"] == {
            "pool": "default",
            "prefix": None,
            "balance": "round-robin",
            "nodes": 2,
            "nodes_up": 2,
            "in_flight": 0,
            "requests": 1,
        }
        assert rows["/scheduling/"]["nodes_up"] == 2 and rows["/scheduling/"]["nodes"] == 2
        assert rows["/scheduling/api/"]["nodes_up"] == 0
        pool_of = {n["node"]: n["pool"] for n in j["proxy"]["nodes"]}
        assert pool_of[sets["s"][0].address] == "/scheduling/"
        assert pool_of[sets["d"][1].address] == "default"
        fam = parse_metrics((await admin_get(port, "/metrics")).body.decode())
        assert metric(fam, "confedge_proxy_pool_nodes_up", pool="default") == 2
        assert metric(fam, "confedge_proxy_pool_nodes_up", pool="/scheduling/") == 2
        assert metric(fam, "confedge_proxy_pool_nodes_up", pool="/scheduling/api/") == 0
        assert metric(fam, "confedge_proxy_pool_nodes", pool="/scheduling/api/") == 2
        assert metric(fam, "confedge_proxy_pool_requests_in_flight", pool="/scheduling/") == 0
        assert metric(fam, "confedge_proxy_pool_requests_total", pool="/scheduling/") == 2
        assert metric(fam, "confedge_proxy_pool_requests_total", pool="/scheduling/api/") == 0
        page = (await admin_get(port, "/status")).body.decode()
        assert "<th>pool</th>" in page and "<code>/scheduling/api/</code>" in page
    finally:
        await rt.close()


async def test_two_workers_route_by_prefix_and_report_per_pool(sets, tmp_path):
    """Worker processes (proxy.workers = 2) build the same pools; their reports to the main
    process keep one in-flight count per node of every pool and one request count per pool."""
    svc = await start(sets, tmp_path, workers=2, health_interval=30)
    try:
        for _ in range(6):
            r = await get(svc.https_port, "/scheduling/api/x")
            assert r.status == 200 and r.json()["node"] in ("a0", "a1")
            r = await get(svc.https_port, "/webapp/")
            assert r.status == 200 and r.json()["node"] in ("d0", "d1")
        stats = None
        for _ in range(60):  # workers report each second
            stats = svc.worker_stats()
            if stats is not None and sum(stats["pool_requests"]) >= 12:
                break
            await asyncio.sleep(0.1)
        assert stats is not None
        assert stats["pool_requests"] == [6, 0, 6]
        assert len(stats["in_flight"]) == len(stats["idle_connections"]) == 6
    finally:
        await svc.close()


async def test_install_pools_again_reroutes_new_requests(sets, tmp_path):
    """What a reload of the node list does (WorkerRuntime.install_pools + start_health_checks,
    both built from build_pools): new requests follow the new pools at once."""
    svc = await start(sets, tmp_path, health_interval=30)
    try:
        assert set(await nodes_of(svc.https_port, "/scheduling/x", 2)) == {"s0", "s1"}
        new = proxy_config(
            [u.address for u in sets["d"]],
            str(tmp_path),
            pools=[{"prefix": "/scheduling/", "nodes": [sets["a"][1].address]}],
            health_interval=0.1,
        )
        core = svc.core
        assert core is not None
        core.install_pools(new)
        core.start_health_checks()
        assert len(core._health_tasks) == 2
        assert set(await nodes_of(svc.https_port, "/scheduling/x", 3)) == {"a1"}
        assert set(await nodes_of(svc.https_port, "/scheduling/api/x", 2)) == {"a1"}
        assert set(await nodes_of(svc.https_port, "/webapp/", 2)) == {"d0", "d1"}
        checks = sets["a"][1].status_checks
        await asyncio.sleep(0.35)
        assert sets["a"][1].status_checks > checks  # the new pool's own checks run
    finally:
        await svc.close()
