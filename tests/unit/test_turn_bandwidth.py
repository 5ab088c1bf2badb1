"""Bandwidth caps (issue 15): values, the token bucket, config keys and defaults, and the core's
policies (refuse, degrade), drain answers and answer tallies, in simulated time."""

from __future__ import annotations

import socket

import pytest
from test_turn_core import T0, Cli, code, make_core

from confedge.config import ConfigError
from confedge.stun import Attr, check_integrity, decode_address
from confedge.turn.bandwidth import TokenBucket, burst_for, format_rate, parse_rate
from confedge.turn.dataplane import TO_PEER, AllocationCounters, ClientSink, _RelayProtocol
from confedge.turn.testing import turn_config


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        (125000, 125000),
        ("unlimited", 0),
        (0, 0),
        ("0", 0),
        ("10M", 10_000_000),
        ("10MB", 10_000_000),
        ("2.5Mbit", 312_500),
        ("2.5Mbps", 312_500),
        ("500k", 500_000),
        ("1G", 1_000_000_000),
        ("800 kbit", 100_000),
    ],
)
def test_parse_rate(value: object, rate: int) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", ["fast", "10 Mhz", "-5", -5, True, 1.5, "M"])
def test_parse_rate_refuses_with_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValueError, match=r"bandwidth|negative"):
        parse_rate(value)


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(625_000) == "5 Mbit/s"


def test_bucket_holds_a_flow_to_its_rate_after_the_burst() -> None:
    rate = 100_000
    b = TokenBucket(rate, now=T0)
    assert b.burst == burst_for(rate) == 65536  # at least 64 KiB
    sent = 0
    # 1000-byte packets offered at 500 kB/s for 10 s of simulated time.
    for i in range(5000):
        if b.take(T0 + i * 0.002, 1000):
            sent += 1000
    assert abs(sent - (b.burst + 10 * rate)) <= 2000


def test_bucket_unlimited_and_take_all_is_all_or_nothing() -> None:
    assert TokenBucket(0).take(T0, 10**9)
    small, big = TokenBucket(1000, burst=1000, now=T0), TokenBucket(10**6, now=T0)
    assert not TokenBucket.take_all(T0, 1500, (big, small, None))
    assert big.tokens == big.burst  # the refused packet took nothing from the other bucket
    assert TokenBucket.take_all(T0, 800, (big, small, None))
    assert small.tokens == 200


def test_relay_with_shared_buckets_spends_its_own_only_when_they_say_yes() -> None:
    """A stream client's allocation under the native plane (UdpDataPlane.share_buckets): its
    own bucket is judged first, then the engine's shared ones; a packet they refuse takes
    nothing from its own bucket and counts as a drop."""
    answers: list[bool] = []
    charged: list[tuple[int, int]] = []

    def charge(direction: int, n: int) -> bool:
        charged.append((direction, n))
        return answers.pop(0)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        relay = _RelayProtocol(1, 4, ClientSink(None, None), sock)
        mine = TokenBucket(10**6, now=T0)
        relay.set_buckets((mine,), (None,), charge)
        assert relay.limited
        answers[:] = [False, True]
        assert not relay.admit(1000, TO_PEER)
        assert mine.tokens == mine.burst and relay.dropped_bw == 1
        assert relay.admit(1000, TO_PEER)
        assert mine.tokens == mine.burst - 1000
        assert charged == [(TO_PEER, 1000), (TO_PEER, 1000)]
        relay.set_buckets((None,), (None,), None)
        assert not relay.limited  # no cap anywhere: the hot path skips admit


def test_config_defaults_by_mode_and_explicit_values() -> None:
    r = turn_config().turn
    assert (r.effective_bandwidth_per_allocation, r.effective_bandwidth_per_user) == (0, 0)
    p = turn_config(mode="permissive").turn
    assert p.effective_bandwidth_per_allocation == 625_000  # 5 Mbit/s
    assert p.effective_bandwidth_per_user == 1_250_000
    assert p.effective_bandwidth_total == 0
    c = turn_config(
        mode="permissive", bandwidth_per_allocation="unlimited", bandwidth_total="1Gbit"
    ).turn
    assert c.effective_bandwidth_per_allocation == 0
    assert c.effective_bandwidth_total == 125_000_000
    assert c.bandwidth_policy == "refuse"


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"turn\.bandwidth_per_user.*not a bandwidth"):
        turn_config(bandwidth_per_user="lots")
    with pytest.raises(ConfigError, match=r"turn\.bandwidth_policy"):
        turn_config(bandwidth_policy="drop")


def _busy(dp: object, alloc_id: int, to_peer: int, to_client: int = 0) -> None:
    dp.traffic[alloc_id] = AllocationCounters(  # type: ignore[attr-defined]
        bytes_to_peer=to_peer, bytes_to_client=to_client
    )


def test_core_hands_the_caps_to_the_data_plane_with_the_username() -> None:
    core, dp = make_core(bandwidth_per_allocation=1000, bandwidth_per_user=2000)
    assert dp.bandwidth == (1000, 2000, 0)
    assert code(Cli(core).allocate(T0)) == 200
    assert [a["user"] for a in dp.allocations.values()] == ["turnuser"]


def test_refuse_policy_answers_508_while_the_relay_runs_at_its_total_cap() -> None:
    core, dp = make_core(bandwidth_total=100_000, bandwidth_policy="refuse")
    assert code(Cli(core, port=1).allocate(T0)) == 200
    core.sample(T0)
    _busy(dp, 1, 99_000)  # 99 kB in one second: at the cap
    core.sample(T0 + 1)
    assert core.relay_rate[0] == pytest.approx(99_000)
    late = Cli(core, port=2).allocate(T0 + 1)
    assert code(late) == 508
    assert core.answers.counts[(508, "bandwidth-total")] == 1
    core.sample(T0 + 2)  # nothing moved in the last second: room again
    assert code(Cli(core, port=3).allocate(T0 + 2)) == 200


def test_degrade_policy_gives_busy_allocations_an_equal_share() -> None:
    core, dp = make_core(
        bandwidth_total=90_000, bandwidth_policy="degrade", bandwidth_per_allocation=50_000
    )
    for port in (1, 2, 3, 4):
        assert code(Cli(core, port=port).allocate(T0)) == 200
    core.sample(T0)
    _busy(dp, 1, 60_000)
    _busy(dp, 2, 20_000)
    _busy(dp, 3, 10_000)  # allocation 4 is idle
    core.sample(T0 + 1)
    # 90 kB/s moved: saturated; three busy allocations get 30 kB/s each (below their own cap).
    assert [dp.allocations[i]["rate"] for i in (1, 2, 3, 4)] == [30_000] * 4
    core.sample(T0 + 2)  # nothing moved since: back to the per-allocation cap
    assert [dp.allocations[i]["rate"] for i in (1, 2, 3, 4)] == [50_000] * 4


def test_drain_redirects_with_an_authenticated_300_and_lets_refresh_through() -> None:
    core, _ = make_core(alternate_server=("192.0.2.99", 3478))
    old = Cli(core, port=1)
    assert code(old.allocate(T0)) == 200
    ended: list[float] = []
    core.on_drained = lambda: ended.append(T0)
    core.start_drain(T0)
    new = Cli(core, port=2)
    answer = new.allocate(T0 + 1)
    assert code(answer) == 300
    assert check_integrity(answer, new.key)
    raw = answer.get(Attr.ALTERNATE_SERVER)
    assert raw is not None and decode_address(raw) == ("192.0.2.99", 3478)
    assert code(old.refresh(T0 + 2, 600)) == 200
    assert code(old.permission(T0 + 2, "198.51.100.20")) == 200
    assert not ended
    assert code(old.refresh(T0 + 3, 0)) == 200
    assert ended
    assert core.answers.counts[(300, "draining")] == 1
    assert core.lifetimes.n == 1 and core.lifetimes.total == pytest.approx(3.0)
    core.cancel_drain()
    assert code(Cli(core, port=3).allocate(T0 + 4)) == 200


def test_drain_without_alternate_answers_508() -> None:
    core, _ = make_core()
    core.start_drain(T0)
    assert code(Cli(core).allocate(T0)) == 508
    assert core.drain.refused == 1 and core.drain.redirected == 0


def test_answers_are_tallied_by_cause() -> None:
    core, _ = make_core()
    Cli(core, ip="10.9.9.9").allocate(T0)  # not a media node
    Cli(core, password="wrong").allocate(T0)
    tally = core.answers.counts
    assert tally[(403, "not-media-node")] == 1
    assert tally[(401, "no-credentials")] >= 1
    assert tally[(401, "bad-credentials")] == 1
