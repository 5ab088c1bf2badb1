"""turn/portdraw.py: relay ports drawn uniformly from the whole range (RFC 8656 §7.2)."""

from __future__ import annotations

from collections import Counter

import pytest

from confedge.turn.portdraw import PortDraw, PortTable


def test_every_port_of_a_small_range_comes_up_about_equally() -> None:
    draw = PortDraw()
    counts = Counter(draw.randint(50000, 50009) for _ in range(20000))
    assert set(counts) == set(range(50000, 50010))  # both ends included, nothing outside
    assert all(1700 < n < 2300 for n in counts.values()), counts


def test_large_range_and_single_port() -> None:
    draw = PortDraw()
    seen = {draw.randint(1024, 65535) for _ in range(5000)}
    assert min(seen) >= 1024 and max(seen) <= 65535 and len(seen) > 4500
    assert draw.randint(3478, 3478) == 3478


def test_empty_range_is_refused() -> None:
    with pytest.raises(ValueError, match="empty range"):
        PortDraw().randint(10, 9)


def test_port_table_finds_the_last_free_port_of_an_almost_full_range() -> None:
    """32 random draws miss it 97% of the time; the scan after them does not."""
    table = PortTable(40000, 40999)
    for p in range(40000, 41000):
        if p != 40613:
            table.hold(p)
    assert table.count == 999
    assert {table.candidate() for _ in range(50)} == {40613}
    table.hold(40613)
    assert table.candidate() == -1
    table.free(40001)
    assert table.candidate() == 40001 and table.count == 999


def test_port_table_draws_free_ports_uniformly_and_honours_even_and_pair() -> None:
    table = PortTable(50000, 50009)
    for p in (50002, 50005, 50007):
        table.hold(p)
    counts = Counter(table.candidate() for _ in range(14000))
    assert set(counts) == {50000, 50001, 50003, 50004, 50006, 50008, 50009}
    assert all(1700 < n < 2300 for n in counts.values()), counts
    evens = {table.candidate(even=True) for _ in range(500)}
    assert evens == {50000, 50004, 50006, 50008}
    # a pair: an even port with the next one free too (50004: 50005 is held)
    assert {table.candidate(even=True, pair=True) for _ in range(500)} == {50000, 50008}


def test_port_table_hold_and_free_are_idempotent_and_ignore_ports_outside() -> None:
    table = PortTable(100, 101)
    table.hold(100)
    table.hold(100)
    table.hold(99)
    table.free(102)
    assert table.count == 1 and table.held(100) and not table.held(99)
    table.free(100)
    table.free(100)
    assert table.count == 0
    with pytest.raises(ValueError, match="empty range"):
        PortTable(10, 9)
