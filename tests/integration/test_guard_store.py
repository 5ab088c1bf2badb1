"""Guard stores for real: an SQLite file shared by guards, a real redis-server shared by guards,
Redis going away and coming back, and the `confedge bans` command on an SQLite store."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path

import pytest
from guard_redis import free_port, redis_server

from confedge.config import Config, GuardConfig, parse_config, parse_section
from confedge.guard import Guard, create_guard
from confedge.guard.cli import bans_command, parse_duration
from confedge.guard.redis_store import RedisStore
from confedge.guard.sqlite_store import SQLiteStore
from confedge.guard.store import StoreError


def gcfg(**kw: object) -> GuardConfig:
    base: dict[str, object] = {
        "enabled": True,
        "jitter": 0.0,
        "ignore": [],
        "maxretry": 3,
        "refresh_interval": 0.25,
    }
    base.update(kw)
    return parse_section(GuardConfig, base)


async def wait_banned(g: Guard, ip: str, within: float = 1.0) -> float:
    """Seconds until g sees ip banned; fails beyond `within`."""
    t0 = time.monotonic()
    while g.check(ip) is None:
        assert time.monotonic() - t0 < within, f"{ip} not banned within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_sqlite_bans_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "guard.sqlite3"
    g = Guard(gcfg(bantime=120), SQLiteStore(db))
    await g.start()
    for _ in range(3):
        g.record_pin_failure("198.51.100.20", "meet", "1111")
    g.record_pin_failure("198.51.100.21", "meet", "2222")  # a count, not a ban
    await g.close()
    assert db.exists() and (db.parent.stat().st_mode & 0o777) == 0o700
    g2 = Guard(gcfg(bantime=120), SQLiteStore(db))
    await g2.start()
    try:
        left = g2.check("198.51.100.20")
        assert left is not None and 110 < left <= 120
        # Counts survive too: two more failures from .21 make three within findtime.
        g2.record_pin_failure("198.51.100.21", "meet", "3333")
        assert g2.check("198.51.100.21") is None
        g2.record_pin_failure("198.51.100.21", "meet", "4444")
        assert g2.check("198.51.100.21") is not None
    finally:
        await g2.close()


async def test_sqlite_two_guards_share_a_ban_within_one_second(tmp_path: Path) -> None:
    db = tmp_path / "guard.sqlite3"
    a, b = Guard(gcfg(), SQLiteStore(db)), Guard(gcfg(), SQLiteStore(db))
    await a.start()
    await b.start()
    try:
        # Counting is shared: two failures through a, one through b.
        a.record_pin_failure("2001:db8::20", "meet", "1")
        a.record_pin_failure("2001:db8::20", "meet", "2")
        await asyncio.sleep(0.6)  # let b read them
        b.record_pin_failure("2001:db8::20", "meet", "3")
        assert b.check("2001:db8::20") is not None
        took = await wait_banned(a, "2001:db8::20")
        assert took < 1.0
    finally:
        await a.close()
        await b.close()


async def test_sqlite_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    g = Guard(gcfg(), SQLiteStore(blocker / "guard.sqlite3"))
    with pytest.raises(StoreError, match="cannot open the guard database"):
        await g.start()


async def test_redis_two_guards_share_a_ban_within_one_second() -> None:
    with redis_server() as srv:
        a, b = Guard(gcfg(), RedisStore(srv.url)), Guard(gcfg(), RedisStore(srv.url))
        await a.start()
        await b.start()
        try:
            a.record_pin_failure("198.51.100.30", "meet", "1")
            await asyncio.sleep(0.6)
            b.record_pin_failure("198.51.100.30", "meet", "2")
            b.record_pin_failure("198.51.100.30", "meet", "3")
            assert b.check("198.51.100.30") is not None
            assert await wait_banned(a, "198.51.100.30") < 1.0
            # And from a to b, over IPv6 /64 this time.
            for _ in range(3):
                a.record_turn_auth_failure("2001:db8::31")
            assert a.check("2001:db8::31") is None  # turn_maxretry is 20
        finally:
            await a.close()
            await b.close()
        bans = await _list(RedisStore(srv.url))
        assert [x.source for x in bans] == ["198.51.100.30"]


async def _list(store: RedisStore) -> list:  # type: ignore[type-arg]
    await store.open()
    try:
        return await store.list_bans()
    finally:
        await store.close()


async def test_redis_down_keeps_working_locally_and_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard")
    with redis_server() as srv:
        a, b = Guard(gcfg(), RedisStore(srv.url)), Guard(gcfg(), RedisStore(srv.url))
        await a.start()
        await b.start()
        try:
            srv.stop()
            await asyncio.sleep(0.6)
            for _ in range(3):
                a.record_pin_failure("198.51.100.40", "meet", "x")
            assert a.check("198.51.100.40") is not None  # banned locally, store or not
            await asyncio.sleep(0.6)
            down = [
                r
                for r in caplog.records
                if r.name == "confedge.guard" and "unreachable" in r.getMessage()
            ]
            assert len(down) == 2  # once per guard, not once per tick
            assert b.check("198.51.100.40") is None
            srv.start()  # same port, empty database
            took = await wait_banned(b, "198.51.100.40", within=3.0)
            assert took < 3.0
            assert "reachable again" in caplog.text
        finally:
            await a.close()
            await b.close()


async def test_redis_unreachable_at_start_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard")
    g = Guard(gcfg(), RedisStore(f"redis://127.0.0.1:{free_port(34900)}/0"))
    t0 = time.monotonic()
    await g.start()
    assert time.monotonic() - t0 < 2.0
    for _ in range(3):
        g.record_pin_failure("198.51.100.41", "meet", "x")
    assert g.check("198.51.100.41") is not None
    await g.close()
    assert "unreachable" in caplog.text


def _cfg(tmp_path: Path, store: str = "sqlite") -> Config:
    return parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "guard": {"enabled": True, "store": store, "bantime": 300},
        }
    )


def _run(cfg: Config, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = bans_command(cfg, list(argv), out=out)
    return rc, out.getvalue()


def test_bans_cli_add_list_remove_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="confedge.guard.audit")
    cfg = _cfg(tmp_path)
    assert _run(cfg, "list") == (0, "no active bans\n")
    rc, out = _run(cfg, "add", "198.51.100.50", "--time", "10m", "--reason", "ticket 42")
    assert rc == 0 and out.startswith("banned 198.51.100.50 for 10m00s")
    rc, out = _run(cfg, "add", "2001:db8:1:2::5/64")
    assert rc == 0 and "2001:db8:1:2::/64" in out and "5m00s" in out
    rc, out = _run(cfg, "list")
    lines = out.splitlines()
    assert lines[0].split() == [
        "SOURCE",
        "REASON",
        "FAILURES",
        "OFFENCE",
        "EXPIRES",
        "(UTC)",
        "LEFT",
    ]
    assert lines[1].startswith("2001:db8:1:2::/64") and lines[2].startswith("198.51.100.50")
    assert "manual: ticket 42" in lines[2]
    rc, out = _run(cfg, "list", "--json")
    data = json.loads(out)
    assert [d["source"] for d in data] == ["2001:db8:1:2::/64", "198.51.100.50"]
    assert 590 < data[1]["seconds_left"] <= 600 and data[1]["reason"] == "manual: ticket 42"
    # A running guard on the same store sees the operator's ban.
    g = create_guard(cfg)

    async def seen() -> float | None:
        await g.start()
        try:
            return g.check("2001:db8:1:2:ffff::1")
        finally:
            await g.close()

    assert asyncio.run(seen()) is not None
    assert _run(cfg, "remove", "198.51.100.50") == (0, "lifted the ban of 198.51.100.50\n")
    assert _run(cfg, "remove", "198.51.100.50")[0] == 1
    assert "not banned" in capsys.readouterr().err
    assert _run(cfg, "clear") == (0, "cleared 1 active ban(s)\n")
    assert _run(cfg, "list", "--json") == (0, "[]\n")
    audit = [r.getMessage() for r in caplog.records if r.name == "confedge.guard.audit"]
    assert len([m for m in audit if m.startswith("ban ")]) == 2
    assert len([m for m in audit if m.startswith("unban ")]) == 2  # remove + clear


def test_bans_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    assert _run(cfg, "add", "192.0.2.0/24")[0] == 2
    assert "block wider networks in the firewall" in capsys.readouterr().err
    assert _run(cfg, "add", "192.0.2.1", "--time", "soon")[0] == 2
    assert '"soon" is not a duration' in capsys.readouterr().err
    assert _run(cfg, "frobnicate")[0] == 2
    assert _run(_cfg(tmp_path, "memory"), "list")[0] == 1
    assert "bans live only inside the running process" in capsys.readouterr().err
    with pytest.raises(ValueError):
        parse_duration("-5")
    assert parse_duration("1.5h") == 5400


def test_bans_cli_on_redis(tmp_path: Path) -> None:
    with redis_server() as srv:
        cfg = _cfg(tmp_path, srv.url)
        assert _run(cfg, "add", "198.51.100.60", "--time", "30")[0] == 0
        rc, out = _run(cfg, "list", "--json")
        assert rc == 0 and [d["source"] for d in json.loads(out)] == ["198.51.100.60"]
        assert _run(cfg, "remove", "198.51.100.60")[0] == 0
        assert _run(cfg, "list", "--json") == (0, "[]\n")
    # Redis gone: a clear error, exit status 1, no traceback.
    assert _run(cfg, "list")[0] == 1
