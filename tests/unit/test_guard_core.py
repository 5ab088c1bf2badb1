"""Guard core in simulated time: thresholds, windows, escalation, /64, conference, TURN."""

from __future__ import annotations

import pytest

from confedge.config import GuardConfig, parse_section
from confedge.guard.bantable import BanTable
from confedge.guard.core import REASON_MAX, BanRecord, Failure, GuardCore, ban_duration

T0 = 1_700_000_000.0


def cfg(**kw: object) -> GuardConfig:
    base: dict[str, object] = {"enabled": True, "jitter": 0.0, "ignore": []}
    base.update(kw)
    return parse_section(GuardConfig, base)


def pin(ip: str, t: float, alias: str = "meet", p: str = "") -> Failure:
    return Failure(t, "pin", ip, alias, p or f"h{t}")


def feed(core: GuardCore, fails: list[Failure]) -> list[BanRecord]:
    out: list[BanRecord] = []
    for f in fails:
        out += core.observe(f, f.ts)
    return out


def test_threshold_bans_on_the_maxretry_th_failure() -> None:
    core = GuardCore(cfg())
    assert feed(core, [pin("198.51.100.7", T0 + i) for i in range(9)]) == []
    bans = core.observe(pin("198.51.100.7", T0 + 9), T0 + 9)
    assert [b.source for b in bans] == ["198.51.100.7"]
    b = bans[0]
    assert b.expires - b.created == 300.0
    assert b.count == 1 and b.failures == 10
    assert "10 wrong PINs (10 distinct)" in b.reason
    assert core.is_banned("198.51.100.7", T0 + 300) and not core.is_banned("198.51.100.7", T0 + 310)


def test_sliding_window_forgets_old_failures() -> None:
    core = GuardCore(cfg(maxretry=3, findtime=60))
    ip = "198.51.100.8"
    # Two failures every 61 s never reach 3 inside any 60 s window.
    fails = [pin(ip, T0 + k * 61 + d) for k in range(5) for d in (0, 1)]
    assert feed(core, fails) == []
    # The window slides: failures at t, t+30, t+59 are three inside 60 s.
    t = T0 + 1000
    assert feed(core, [pin(ip, t), pin(ip, t + 30)]) == []
    assert [b.source for b in core.observe(pin(ip, t + 59), t + 59)] == [ip]


def test_window_boundary_is_exclusive_of_expired_events() -> None:
    core = GuardCore(cfg(maxretry=2, findtime=10))
    ip = "198.51.100.9"
    assert feed(core, [pin(ip, T0)]) == []
    assert core.observe(pin(ip, T0 + 10), T0 + 10) == []  # the first is exactly findtime old
    assert core.observe(pin(ip, T0 + 19), T0 + 19) != []


def test_escalation_multiplies_and_caps_and_memory_resets() -> None:
    c = cfg(maxretry=1, bantime=100, escalation=3, max_bantime=1000, ban_memory=5000)
    core = GuardCore(c)
    ip = "203.0.113.5"
    t = T0
    lengths = []
    for _ in range(5):
        (b,) = core.observe(pin(ip, t), t)
        lengths.append(b.expires - b.created)
        t = b.expires + 1
    assert lengths == [100, 300, 900, 1000, 1000]
    # Beyond ban_memory after the last ban ended, the source starts again at bantime.
    t = core.bans[ip].expires + 5001
    (b,) = core.observe(pin(ip, t), t)
    assert b.count == 1 and b.expires - b.created == 100


def test_jitter_stretches_within_bounds_and_never_beyond_cap() -> None:
    c = cfg(bantime=100, jitter=0.2, max_bantime=110)
    assert ban_duration(c, 1, 0.0) == 100
    assert ban_duration(c, 1, 0.25) == pytest.approx(105)
    assert ban_duration(c, 1, 0.999) == 110  # capped
    assert ban_duration(c, 10_000, 0.5) == 110  # a huge count cannot overflow
    values = {
        GuardCore(cfg(maxretry=1, jitter=0.5), rand=lambda: 0.5)
        .observe(pin("192.0.2.1", T0), T0)[0]
        .expires
        - T0
    }
    assert values == {375.0}


def test_ignore_list_is_never_counted() -> None:
    core = GuardCore(cfg(maxretry=1, ignore=["10.0.0.0/8", "2001:db8:1::/48"]))
    assert core.observe(pin("10.1.2.3", T0), T0) == []
    assert core.observe(pin("2001:db8:1:5::9", T0), T0) == []
    assert core.tracked() == 0
    assert core.observe(pin("11.1.2.3", T0), T0) != []


def test_ipv6_slash64_aggregates_rotating_addresses() -> None:
    core = GuardCore(cfg(maxretry=10, prefix_maxretry=30, conference_maxretry=1000))
    # An attacker rotates through his /64: 3 guesses per address, never 10 from one.
    fails = [pin(f"2001:db8:aa:bb::{i // 3 + 1:x}", T0 + i) for i in range(29)]
    assert feed(core, fails) == []
    bans = core.observe(pin("2001:db8:aa:bb::ffff", T0 + 29), T0 + 29)
    assert [b.source for b in bans] == ["2001:db8:aa:bb::/64"]
    table = BanTable(clock=lambda: T0 + 30)
    table.rebuild(core.active(T0 + 30), T0 + 30)
    assert table.check("2001:db8:aa:bb:1234:5678:9abc:def0") is not None
    assert table.check("2001:DB8:AA:BB:0:0:0:1") is not None  # another spelling, same /64
    assert table.check("2001:db8:aa:bc::1") is None
    # IPv4 is not aggregated (CGNAT would ban bystanders).
    v4 = feed(core, [pin(f"198.51.100.{i}", T0 + i) for i in range(40)])
    assert v4 == []


def test_conference_trigger_bans_contributors_and_enters_alert() -> None:
    c = cfg(maxretry=10, conference_maxretry=20, bantime=60)
    core = GuardCore(c)
    # A botnet: 10 sources, 2 guesses each, on one conference; no single source near maxretry.
    fails = [pin(f"192.0.2.{k}", T0 + 2 * k + d, alias="board") for k in range(10) for d in (0, 1)]
    # A legitimate, unrelated conference sees one mistype.
    assert core.observe(pin("198.51.100.1", T0, alias="other"), T0) == []
    bans = feed(core, fails)
    assert sorted(b.source for b in bans) == sorted(f"192.0.2.{k}" for k in range(10))
    assert all(b.reason == "conference board: 20 wrong PINs from 10 sources" for b in bans)
    assert not core.is_banned("198.51.100.1", T0 + 30)
    t = T0 + 30
    assert core.alert_until("board") == pytest.approx(T0 + 19 + 60)
    # During alert one wrong PIN for that conference bans a new source at once...
    (b,) = core.observe(pin("203.0.113.50", t, alias="board"), t)
    assert b.source == "203.0.113.50" and "during alert" in b.reason
    # ...but not for another conference.
    assert core.observe(pin("203.0.113.51", t, alias="other"), t) == []
    # After the alert a single failure is just counted again.
    t2 = T0 + 19 + 61
    assert core.observe(pin("203.0.113.52", t2, alias="board"), t2) == []


def test_turn_failures_ban_after_turn_maxretry() -> None:
    core = GuardCore(cfg(turn_maxretry=5, maxretry=3))
    ip = "198.51.100.77"
    # TURN failures do not count towards the PIN threshold, and vice versa.
    assert feed(core, [pin(ip, T0), pin(ip, T0 + 1)]) == []
    for i in range(4):
        assert core.observe(Failure(T0 + 2 + i, "turn", ip), T0 + 2 + i) == []
    (b,) = core.observe(Failure(T0 + 6, "turn", ip), T0 + 6)
    assert b.source == ip and b.reason == "turn: 5 wrong credentials"


def test_distinct_pins_option_counts_a_repeated_pin_once() -> None:
    core = GuardCore(cfg(maxretry=3, distinct_pins=True))
    ip = "198.51.100.3"
    assert feed(core, [pin(ip, T0 + i, p="same") for i in range(20)]) == []
    assert core.distinct_pins(ip) == 1
    assert core.observe(pin(ip, T0 + 21, p="b"), T0 + 21) == []
    assert core.observe(pin(ip, T0 + 22, p="c"), T0 + 22) != []
    # Default: every failure counts, as in the reference.
    core2 = GuardCore(cfg(maxretry=3))
    assert feed(core2, [pin(ip, T0 + i, p="same") for i in range(3)]) != []


def test_failures_paid_for_by_a_ban_never_count_again() -> None:
    core = GuardCore(cfg(maxretry=3, bantime=10, findtime=300))
    ip = "198.51.100.4"
    fails = [pin(ip, T0 + i) for i in range(3)]
    assert len(feed(core, fails)) == 1
    # The same events replayed (a restarted worker, or another worker's late copies) after the
    # ban ended do not ban again.
    later = T0 + 20
    assert [b for f in fails for b in core.observe(f, later)] == []
    assert core.observe(pin(ip, later), later) == []  # one new failure: count 1


def test_remote_ban_adopted_by_put_resets_counters() -> None:
    core = GuardCore(cfg(maxretry=3))
    ip = "198.51.100.5"
    feed(core, [pin(ip, T0), pin(ip, T0 + 1)])
    core.put(BanRecord(ip, T0 + 2, T0 + 3, 1, 3, "remote"))
    assert core.observe(pin(ip, T0 + 4), T0 + 4) == []
    assert core.observe(pin(ip, T0 + 5), T0 + 5) == []
    assert core.observe(pin(ip, T0 + 6), T0 + 6) != []
    assert core.bans[ip].count == 2  # escalated from the adopted ban


def test_purge_forgets_windows_and_old_bans() -> None:
    core = GuardCore(cfg(maxretry=2, ban_memory=100, findtime=50, bantime=10))
    feed(core, [pin("198.51.100.6", T0), pin("198.51.100.7", T0)])
    feed(core, [pin("198.51.100.8", T0), pin("198.51.100.8", T0 + 1)])
    assert core.tracked() > 0 and "198.51.100.8" in core.bans
    core.purge(T0 + 51)
    assert core.tracked() == 0 and "198.51.100.8" in core.bans  # still remembered
    core.purge(T0 + 200)
    assert core.bans == {}


def test_manual_ban_fixed_or_escalated() -> None:
    core = GuardCore(cfg(bantime=100))
    b = core.manual_ban("2001:db8::/64", T0, 5.0, "manual")
    assert b.expires == T0 + 5 and b.failures == 0
    b2 = core.manual_ban("2001:db8::/64", T0 + 6, None, "manual")
    assert b2.count == 2 and b2.expires - b2.created == 200


def test_conference_replay_after_restart_does_not_ban_again() -> None:
    c = cfg(maxretry=10, conference_maxretry=6, bantime=10, findtime=300)
    fails = [pin(f"192.0.2.{k}", T0 + 2 * k + d, alias="board") for k in range(3) for d in (0, 1)]
    core = GuardCore(c)
    bans = feed(core, fails)
    assert len(bans) == 3
    # A restarted worker loads the bans and replays the window's events after the bans ended.
    fresh = GuardCore(c)
    fresh.set_bans(core.bans.values())
    later = T0 + 100
    assert [b for f in fails for b in fresh.observe(f, later)] == []


def test_reasons_are_bounded_wherever_they_come_from() -> None:
    """A reason is a log field, a status-page cell and a value in the shared store: a long
    conference alias from a request path, or a megabyte another instance or a hand edit put
    into Redis, is cut to REASON_MAX characters."""
    core = GuardCore(cfg(maxretry=1000, conference_maxretry=1))  # (its reason names the alias)
    (ban,) = core.observe(pin("198.51.100.8", T0, alias="a" * 8000), T0)
    assert ban.reason.startswith("conference aaa")
    assert len(ban.reason) == REASON_MAX and ban.reason.endswith("\u2026")
    manual = core.manual_ban("198.51.100.9", T0, 60, "x" * 5000)
    assert len(manual.reason) == REASON_MAX
    stored = {
        "source": "198.51.100.10", "created": T0, "expires": T0 + 60, "count": 1,
        "failures": 3, "reason": "y" * 1_000_000,
    }  # fmt: skip
    assert len(BanRecord.from_json(stored).reason) == REASON_MAX
    short = {**stored, "reason": "3 wrong PINs for meet"}
    assert BanRecord.from_json(short).reason == "3 wrong PINs for meet"
