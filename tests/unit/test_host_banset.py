"""The guard's bans as nft commands (sans-I/O), and the background task that runs them."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from pathlib import Path

import pytest

from confedge.guard.core import BanRecord
from confedge.host.banset import BanSetSync, KernelBanSet, element, read_banned

T0 = 1_800_000_000.0


def _ban(source: str, seconds: float, created: float = T0) -> BanRecord:
    return BanRecord(source, created, created + seconds, 1, 10, "pin")


def test_element_renders_addresses_and_prefixes() -> None:
    assert element("192.0.2.7") == (4, "192.0.2.7")
    assert element("2001:db8::1") == (6, "2001:db8::1")
    assert element("2001:db8:1:2::/64") == (6, "2001:db8:1:2::/64")
    assert element("192.0.2.7 } ; flush ruleset") is None  # never passed through as text


def test_new_bans_are_upserted_with_their_remaining_time() -> None:
    sync = BanSetSync()
    wanted, cmds = sync.plan([_ban("192.0.2.7", 300), _ban("2001:db8::/64", 600)], T0 + 10)
    assert cmds == [
        "add element inet confedge confedge_banned_v4 { 192.0.2.7 timeout 1s }",
        "delete element inet confedge confedge_banned_v4 { 192.0.2.7 }",
        "add element inet confedge confedge_banned_v4 { 192.0.2.7 timeout 290s }",
        "add element inet confedge confedge_banned_v6 { 2001:db8::/64 timeout 1s }",
        "delete element inet confedge confedge_banned_v6 { 2001:db8::/64 }",
        "add element inet confedge confedge_banned_v6 { 2001:db8::/64 timeout 590s }",
    ]
    sync.applied(wanted)
    assert sync.plan([_ban("192.0.2.7", 300), _ban("2001:db8::/64", 600)], T0 + 20)[1] == []


def test_lifted_bans_are_removed_expired_ones_left_to_the_kernel() -> None:
    sync = BanSetSync()
    sync.applied(sync.plan([_ban("192.0.2.7", 300), _ban("192.0.2.8", 30)], T0)[0])
    # 192.0.2.7 lifted by hand at T0+100; 192.0.2.8 expired at T0+30 (its element timed out).
    _, cmds = sync.plan([], T0 + 100)
    assert cmds == [
        "add element inet confedge confedge_banned_v4 { 192.0.2.7 timeout 1s }",
        "delete element inet confedge confedge_banned_v4 { 192.0.2.7 }",
    ]


def test_read_banned_keeps_remaining_time() -> None:
    listing = json.dumps(
        {
            "nftables": [
                {"metainfo": {}},
                {
                    "set": {
                        "name": "confedge_banned_v4",
                        "elem": [{"elem": {"val": "192.0.2.7", "timeout": 300, "expires": 250}}],
                    }
                },
                {
                    "set": {
                        "name": "confedge_banned_v6",
                        "elem": [
                            {
                                "elem": {
                                    "val": {"prefix": {"addr": "2001:db8::", "len": 64}},
                                    "expires": 10,
                                }
                            },
                            "2001:db8::9",
                        ],
                    }
                },
                {"set": {"name": "media_nodes_v4", "elem": ["10.0.0.1"]}},
            ]
        }
    )
    assert read_banned(listing) == {
        4: ["192.0.2.7 timeout 250s"],
        6: ["2001:db8::/64 timeout 10s", "2001:db8::9"],
    }
    assert read_banned("not json") == {4: [], 6: []}


class _FakeGuard:
    def __init__(self) -> None:
        self.observers: list[object] = []
        self.records: list[BanRecord] = []

    def bans(self) -> list[BanRecord]:
        return list(self.records)


def _fake_nft(tmp_path: Path, exit_status: int) -> Path:
    """A stand-in `nft` that records its stdin (the batch) and exits as told."""
    script = tmp_path / "nft"
    script.write_text(
        f"#!/bin/sh\ncat >> {tmp_path}/batches\necho ---- >> {tmp_path}/batches\n"
        f"echo 'Error: No such file or directory' >&2\nexit {exit_status}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


async def test_kernel_ban_set_runs_one_batch_per_burst(tmp_path: Path) -> None:
    guard = _FakeGuard()
    ks = KernelBanSet(guard, nft=str(_fake_nft(tmp_path, 0)), clock=lambda: T0)  # type: ignore[arg-type]
    await ks.start()
    try:
        guard.records = [_ban("192.0.2.7", 300), _ban("192.0.2.8", 300)]
        for observer in guard.observers:
            observer()  # type: ignore[operator]
        for _ in range(200):
            if ks.batches:
                break
            await asyncio.sleep(0.01)
        assert ks.batches == 1
        batches = (tmp_path / "batches").read_text().split("----\n")
        assert "192.0.2.7 timeout 300s" in batches[0] and "192.0.2.8 timeout 300s" in batches[0]
    finally:
        await ks.close()
    assert guard.observers == []


async def test_kernel_ban_set_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = _FakeGuard()
    ks = KernelBanSet(guard, nft=str(_fake_nft(tmp_path, 1)), clock=lambda: T0)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, "confedge.host")
    for n in range(3):
        guard.records = [_ban(f"192.0.2.{n + 1}", 300)]
        await ks.apply_once()
    warnings = [r.getMessage() for r in caplog.records if "guard.firewall" in r.getMessage()]
    assert len(warnings) == 1
    assert "No such file or directory" in warnings[0] and "firewall --apply" in warnings[0]
    assert ks.sync.loaded == {}  # nothing believed loaded: the next change retries all
    missing = KernelBanSet(guard, nft=str(tmp_path / "absent"), clock=lambda: T0)  # type: ignore[arg-type]
    await missing.apply_once()  # no exception
