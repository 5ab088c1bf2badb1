"""Node pools per path prefix (proxy/pools.py) in simulated time: config validation, longest
prefix routing, one Balancer per slice of the global node list, failover that never leaves a
pool, health thresholds per pool."""

from __future__ import annotations

from typing import Any

import pytest

from confedge.config import ConfigError, parse_config
from confedge.proxy import exchange as X
from confedge.proxy.balancer import Balancer
from confedge.proxy.exchange import Exchange, ExchangeSettings, State
from confedge.proxy.health import HealthMonitor
from confedge.proxy.pools import build_pools, route

from .helpers import request, take

BASE: dict[str, Any] = {
    "proxy": {"nodes": ["10.0.0.11", "10.0.0.12"]},
    "turn": {"enabled": False},
}


def cfg_with(pools: list[dict[str, Any]], **proxy: Any) -> dict[str, Any]:
    return {**BASE, "proxy": {**BASE["proxy"], **proxy, "pools": pools}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


# -- configuration --------------------------------------------------------------------------------


def test_build_pools_flattens_and_inherits() -> None:
    cfg = parse_config(
        cfg_with(
            [
                {"prefix": "/scheduling/", "nodes": ["10.0.1.1", "10.0.1.2"], "health_rise": 5},
                {"prefix": "/scheduling/api/", "nodes": ["10.0.2.1"], "balance": "ip-hash"},
            ],
            balance="least-conn",
        )
    )
    specs = build_pools(cfg)
    assert [s.name for s in specs] == ["default", "/scheduling/", "/scheduling/api/"]
    assert [s.lo for s in specs] == [0, 2, 4]
    assert [list(s.indices) for s in specs] == [[0, 1], [2, 3], [4]]
    assert [s.balance for s in specs] == ["least-conn", "least-conn", "ip-hash"]
    assert [s.health_rise for s in specs] == [2, 5, 2]
    assert specs[2].nodes[0].url == "https://10.0.2.1:443"


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        (
            {"prefix": "scheduling/", "nodes": ["10.0.1.1"]},
            'proxy.pools[0].prefix: "scheduling/" is not a pool prefix (it must start and end '
            'with "/", e.g. "/scheduling/")',
        ),
        (
            {"prefix": "/scheduling", "nodes": ["10.0.1.1"]},
            'proxy.pools[0].prefix: "/scheduling" is not a pool prefix',
        ),
        ({"prefix": "/", "nodes": ["10.0.1.1"]}, 'proxy.pools[0].prefix: "/" would take every'),
        (
            {"prefix": "/a/./b/", "nodes": ["10.0.1.1"]},
            'proxy.pools[0].prefix: "/a/./b/" is not in canonical form; write it as "/a/b/"',
        ),
        (
            {"prefix": "/%7Euser/", "nodes": ["10.0.1.1"]},
            'write it as "/~user/"',
        ),
        ({"prefix": "/s/", "nodes": []}, "proxy.pools[0].nodes: [] is empty; list the nodes"),
        ({"prefix": "/s/"}, "proxy.pools[0].nodes"),
        ({"prefix": "/s/", "nodes": ["10.0.1.1:99999"]}, "proxy.pools[0].nodes[0]"),
        ({"prefix": "/s/", "nodes": ["10.0.1.1"], "balance": "random"}, "proxy.pools[0].balance"),
        ({"prefix": "/s/", "nodes": ["10.0.1.1"], "health_rise": 0}, "health_rise"),
        ({"prefix": "/s/", "nodes": ["10.0.1.1"], "weight": 3}, "proxy.pools[0].weight"),
    ],
)
def test_bad_pools_are_named(pool: dict[str, Any], expected: str) -> None:
    lines = problems(cfg_with([pool]))
    assert any(expected in line for line in lines), lines


def test_duplicate_prefix_is_refused() -> None:
    lines = problems(
        cfg_with(
            [
                {"prefix": "/scheduling/", "nodes": ["10.0.1.1"]},
                {"prefix": "/other/", "nodes": ["10.0.1.2"]},
                {"prefix": "/scheduling/", "nodes": ["10.0.1.3"]},
            ]
        )
    )
    assert any(
        'prefix "/scheduling/" of pools[2] is also the prefix of pools[0]' in line for line in lines
    ), lines


def test_pools_need_the_proxy() -> None:
    data = cfg_with([{"prefix": "/scheduling/", "nodes": ["10.0.1.1"]}], enabled=False)
    lines = problems(data)
    assert any(
        line.startswith("proxy.pools: 1 pool(s) configured, but proxy.enabled") for line in lines
    )


# -- routing ----------------------------------------------------------------------------------------


def test_longest_prefix_wins_and_unmatched_goes_to_default() -> None:
    prefixes = ["/scheduling/", "/scheduling/api/", "/x/"]
    assert route(prefixes, "/scheduling/index.html") == 1
    assert route(prefixes, "/scheduling/api/v1?a=b") == 2
    assert route(prefixes, "/x/") == 3
    assert route(prefixes, "/scheduling") == 0  # the prefix ends in "/": no partial segment
    assert route(prefixes, "/schedulingX/") == 0
    assert route(prefixes, "/webapp/?next=/scheduling/") == 0  # only from the path's start
    assert route([], "/anything") == 0


# -- one Balancer per slice -------------------------------------------------------------------------


def slices(policy: str = "round-robin") -> tuple[HealthMonitor, Balancer, Balancer, list[int]]:
    h = HealthMonitor(5, rise=[2, 2, 3, 3, 3], fall=[2, 2, 1, 1, 1])
    active = [0] * 5
    default = Balancer(["a", "b"], h.up, policy, h.serving, active=active)  # type: ignore[arg-type]
    pool = Balancer(["c", "d", "e"], h.up, policy, h.serving, lo=2, active=active)  # type: ignore[arg-type]
    return h, default, pool, active


@pytest.mark.parametrize("policy", ["round-robin", "ip-hash", "least-conn"])
def test_each_balancer_stays_in_its_slice(policy: str) -> None:
    h, default, pool, _ = slices(policy)
    seen_default = {default.pick(f"192.0.2.{k}", 0) for k in range(40)}
    seen_pool = {pool.pick(f"192.0.2.{k}", 0) for k in range(40)}
    assert seen_default <= {0, 1} and seen_pool <= {2, 3, 4}
    if policy != "ip-hash":
        assert seen_default == {0, 1} and seen_pool == {2, 3, 4}
    # Every node of the pool tried: None, never a node of the other pool.
    assert pool.pick("192.0.2.1", 0b11100) is None
    assert default.pick("192.0.2.1", 0b00011) is None
    # The pool's nodes all down: the default pool is untouched.
    for i in (2, 3, 4):
        h.passive_failure(i, 1.0, "down")
    assert pool.pick("192.0.2.1", 0) is None and pool.pick_serving("192.0.2.1", 0) is None
    assert default.pick("192.0.2.1", 0) in (0, 1)


def test_round_robin_per_pool_is_independent() -> None:
    _, default, pool, _ = slices()
    assert [pool.pick("x", 0) for _ in range(4)] == [2, 3, 4, 2]
    assert [default.pick("x", 0) for _ in range(3)] == [0, 1, 0]
    assert pool.pick("x", 1 << 3) == 4  # 3 tried: skipped, within the slice


def test_least_conn_reads_the_shared_active_counts() -> None:
    _, _, pool, active = slices("least-conn")
    active[2], active[3], active[4] = 5, 1, 3
    assert pool.pick("x", 0) == 3


def test_health_thresholds_per_pool() -> None:
    h, _, _, _ = slices()
    # Pool nodes fall after 1 failed check, default nodes after 2.
    assert h.check_result(2, "fail", 1.0, "refused") is not None
    assert h.check_result(0, "fail", 1.0, "refused") is None
    assert h.check_result(0, "fail", 2.0, "refused") is not None
    # And rise after 3 (pool) or 2 (default) passed checks.
    for t in (3.0, 4.0):
        assert h.check_result(0, "ok", t) is None or t == 4.0
        assert h.check_result(2, "ok", t) is None
    assert h.up[0] and not h.up[2]
    t = h.check_result(2, "ok", 5.0)
    assert t is not None and t.reason == "3 status checks passed" and h.up[2]


# -- the exchange core with a pool's settings -------------------------------------------------------


def pool_settings() -> tuple[ExchangeSettings, ExchangeSettings, HealthMonitor]:
    h, default, pool, _ = slices()
    netlocs = [f"10.0.0.{i}:443" for i in range(1, 6)]
    return (
        ExchangeSettings(nodes=default, netlocs=netlocs, fqdn=b"edge.example"),
        ExchangeSettings(nodes=pool, netlocs=netlocs, fqdn=b"edge.example"),
        h,
    )


def test_failover_stays_in_the_pool_then_502() -> None:
    _, st, _ = pool_settings()
    ex = Exchange(st, request(target="/scheduling/x"), client_ip="192.0.2.7", peer="192.0.2.7")
    ex.start(0.0, buffer_body=False)
    tried = []
    for k in range(3):
        _, _, actions = take(ex)
        i = next(a for kind, a in actions if kind == X.A_CONNECT)[0]
        tried.append(i)
        ex.node_connect_failed(i, "connect error: refused", 0.1 * k)
    _, _, actions = take(ex)
    assert sorted(tried) == [2, 3, 4]
    assert [a for kind, a in actions if kind == X.A_LOCAL] == [(502, b"", True)]
    assert ex.addrs == ["10.0.0.3:443", "10.0.0.4:443", "10.0.0.5:443"]
    assert ex.state == State.DONE


def test_pool_all_down_gives_503_while_default_serves() -> None:
    default, st, h = pool_settings()
    for i in (2, 3, 4):
        h.passive_failure(i, 1.0, "down")
    ex = Exchange(st, request(target="/scheduling/x"), client_ip="192.0.2.7", peer="192.0.2.7")
    ex.start(2.0, buffer_body=False)
    _, _, actions = take(ex)
    assert [a for kind, a in actions if kind == X.A_LOCAL] == [(503, b"", True)]
    ok = Exchange(default, request(target="/webapp/"), client_ip="192.0.2.7", peer="192.0.2.7")
    ok.start(2.0, buffer_body=False)
    _, _, actions = take(ok)
    assert next(a for kind, a in actions if kind == X.A_CONNECT)[0] in (0, 1)


def test_check_prints_pools_and_its_output_parses_again(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.toml"
    path.write_text(
        '[proxy]\nnodes = ["10.0.0.11"]\n[turn]\nenabled = false\n'
        '[[proxy.pools]]\nprefix = "/scheduling/"\nnodes = ["10.0.0.21", "10.0.0.22"]\n'
        'balance = "ip-hash"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "confedge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '[[proxy.pools]]\nprefix = "/scheduling/"\nnodes = ["10.0.0.21", "10.0.0.22"]\n' in (
        out.stdout
    )
    assert "# health_rise is unset ([proxy]'s health_rise applies)" in out.stdout
    again = tmp_path / "again.toml"
    again.write_text(out.stdout)
    out2 = subprocess.run(
        [sys.executable, "-m", "confedge", "check", "--config", str(again)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout.split("\n", 1)[1] == out.stdout.split("\n", 1)[1]


def test_setup_keeps_pools_it_does_not_ask_about() -> None:
    """`confedge setup` has no question for pools; editing an existing file keeps them."""
    from confedge.setup.document import ConfigDocument

    text = (
        '[proxy]\nnodes = ["10.0.0.11"]\n\n# the add-in\n[[proxy.pools]]\n'
        'prefix = "/scheduling/"\nnodes = ["10.0.0.21"]\n\n[turn]\nenabled = false\n'
    )
    doc = ConfigDocument(text)
    doc.set("proxy.nodes", ["10.0.0.12"])
    out = doc.render()
    assert '# the add-in\n[[proxy.pools]]\nprefix = "/scheduling/"\nnodes = ["10.0.0.21"]\n' in out
    cfg = doc.validate()
    assert [(p.prefix, p.nodes) for p in cfg.proxy.pools] == [("/scheduling/", ["10.0.0.21"])]
    assert cfg.proxy.nodes == ["10.0.0.12"]
