"""KernelBanSet against the real kernel: add, extend, lift, and heal after a flushed ruleset.

nft runs inside a namespace made for the test, through a two-line wrapper script, so the
kernel state checked here is real and the root namespace is never touched.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from host_netns import namespaces

from confedge.config import parse_config
from confedge.guard.core import BanRecord
from confedge.host.banset import KernelBanSet
from confedge.host.ruleset import nft_ruleset


class _Guard:
    def __init__(self) -> None:
        self.observers: list[object] = []
        self.records: list[BanRecord] = []

    def bans(self) -> list[BanRecord]:
        return list(self.records)


def _timeouts(edge: object) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in edge.nft_json("table", "inet", "confedge"):  # type: ignore[attr-defined]
        s = item.get("set")
        if isinstance(s, dict) and str(s.get("name", "")).startswith("confedge_banned"):
            for e in s.get("elem", []):
                val = e["elem"]["val"]
                if isinstance(val, dict):
                    val = f"{val['prefix']['addr']}/{val['prefix']['len']}"
                out[val] = int(e["elem"]["timeout"])
    return out


async def test_bans_reach_the_kernel_and_come_back_after_a_flush(tmp_path: Path) -> None:
    cfg = parse_config({"proxy": {"enabled": False}, "turn": {"enabled": False}})
    with namespaces("bans") as ns:
        edge = ns["bans"]
        ruleset = tmp_path / "fw.nft"
        ruleset.write_text(nft_ruleset(cfg))
        edge.exec("nft", "-f", str(ruleset))
        wrapper = tmp_path / "nft"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {edge.name} nft "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)

        now = time.time()
        guard = _Guard()
        ks = KernelBanSet(guard, nft=str(wrapper), clock=lambda: now)  # type: ignore[arg-type]
        guard.records = [
            BanRecord("192.0.2.7", now, now + 300, 1, 10, "pin"),
            BanRecord("2001:db8:1:2::/64", now, now + 600, 1, 30, "pin prefix"),
        ]
        await ks.apply_once()
        assert _timeouts(edge) == {"192.0.2.7": 300, "2001:db8:1:2::/64": 600}

        # A longer ban of the same source replaces the element's timeout.
        guard.records[0] = BanRecord("192.0.2.7", now, now + 1200, 2, 10, "pin")
        await ks.apply_once()
        assert _timeouts(edge)["192.0.2.7"] == 1200

        # `confedge bans remove`: the element goes at once.
        guard.records = guard.records[1:]
        await ks.apply_once()
        assert _timeouts(edge) == {"2001:db8:1:2::/64": 600}

        # Someone flushes and reloads the ruleset: verify() notices and the bans come back.
        edge.exec("nft", "flush", "ruleset")
        edge.exec("nft", "-f", str(ruleset))
        assert _timeouts(edge) == {}
        await ks.apply_once()
        assert _timeouts(edge) == {}  # nothing changed as far as the guard knows...
        await ks.verify()
        await ks.apply_once()
        assert _timeouts(edge) == {"2001:db8:1:2::/64": 600}  # ...until the check heals it
