"""turn/portdraw.py: relay ports drawn uniformly from the whole range (RFC 8656 §7.2)."""

from __future__ import annotations

from collections import Counter

import pytest

from confedge.turn.portdraw import PortDraw


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
