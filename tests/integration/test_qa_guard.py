"""Adversarial QA of the guard's operator surface: a damaged SQLite file in state_dir, a path
in the way, and `confedge bans` with garbage sources and durations.

Real SQLite files in a temporary state_dir; the CLI through `bans_command` (what `confedge bans`
calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from confedge.config import Config, parse_config
from confedge.guard import create_guard
from confedge.guard.cli import bans_command
from confedge.guard.store import StoreError
from ports import free_port


def _cfg(state: Path) -> Config:
    return parse_config(
        {
            "server": {"state_dir": str(state)},
            "proxy": {"enabled": False},
            "turn": {"enabled": False},
            "guard": {"enabled": True, "store": "sqlite", "ignore": [], "jitter": 0.0},
        }
    )


def _bans(cfg: Config, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = bans_command(cfg, list(argv), out)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed-page"])
async def test_damaged_database_is_moved_aside_and_replaced(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path)
    # bans_command runs its own event loop: from this async test, in a thread.
    rc, _, _ = await asyncio.to_thread(_bans, cfg, "add", "192.0.2.1")  # a good db, one ban
    assert rc == 0
    db = tmp_path / "guard.sqlite3"
    good = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"\x13\x37" * 4096)
    elif damage == "truncated":
        db.write_bytes(good[: len(good) // 3])
    else:  # the header survives, a b-tree page does not
        db.write_bytes(good[:4096] + b"\x00" * (len(good) - 4096))
    caplog.set_level(logging.WARNING, "confedge.guard")
    guard = create_guard(cfg)
    await guard.start()  # no exception: the edge starts
    try:
        assert guard.check("192.0.2.1") is None  # the old bans are gone with the damaged file
        guard.record_pin_failure("198.51.100.9", "room", "1")
    finally:
        await guard.close()
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and str(db) in warned[0] and ".damaged-" in warned[0]
    aside = list(tmp_path.glob("guard.sqlite3.damaged-*"))
    assert [p for p in aside if not p.name.endswith(("-wal", "-shm"))], "damaged file kept"
    with sqlite3.connect(db) as conn:  # the new file is a sound database
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # And it keeps bans across a restart, as the old one did.
    assert (await asyncio.to_thread(_bans, cfg, "add", "192.0.2.2"))[0] == 0
    guard = create_guard(cfg)
    await guard.start()
    try:
        assert guard.check("192.0.2.2") is not None
    finally:
        await guard.close()


async def test_path_in_the_way_is_one_clear_oserror(tmp_path: Path) -> None:
    (tmp_path / "guard.sqlite3").mkdir()
    guard = create_guard(_cfg(tmp_path))
    with pytest.raises(StoreError) as info:
        await guard.start()
    assert isinstance(info.value, OSError)  # `confedge run` prints OSError as one line
    msg = str(info.value)
    assert "guard.sqlite3" in msg and "directory" in msg and "\n" not in msg
    assert (tmp_path / "guard.sqlite3").is_dir()  # not "repaired" away: the operator decides


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("999.1.1.1", '"999.1.1.1" is not an IP address'),
        ("abc", '"abc" is not an IP address'),
        ("", '"" is not an IP address'),
        ("-1", '"-1" is not an IP address'),
        ("1.2.3.4:80", '"1.2.3.4:80" is not an IP address'),
        ("10.0.0.0/8", "block wider networks in the firewall"),
        ("2001:db8::/48", "block wider networks in the firewall"),
        ("10.0.0.0/33", "is not an IP address or IPv6 /64 network"),
    ],
)
def test_bans_add_garbage_source(tmp_path: Path, source: str, expected: str) -> None:
    rc, out, err = _bans(_cfg(tmp_path), "add", "--", source)
    assert rc == 2 and out == ""
    assert err.startswith("confedge bans: ") and expected in err and err.count("\n") == 1


def test_bans_remove_not_banned_and_durations(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    rc, _, err = _bans(cfg, "remove", "198.51.100.7")
    assert rc == 1 and "198.51.100.7 is not banned" in err
    for bad in ("-5", "0", "abc", "1e400", "nan", "1e300", "99999d"):
        rc, _, err = _bans(cfg, "add", "198.51.100.7", f"--time={bad}")
        assert rc == 2, bad
        assert "duration" in err or "longest ban" in err, err
    rc, out, _ = _bans(cfg, "add", "198.51.100.7", "--time=3650d")
    assert rc == 0 and "banned 198.51.100.7" in out
    rc, out, _ = _bans(cfg, "list")
    assert rc == 0 and "198.51.100.7" in out


def test_bans_list_survives_an_absurd_stored_expiry(tmp_path: Path) -> None:
    """A store written before the cap (or edited by hand) must not break `bans list`."""
    cfg = _cfg(tmp_path)
    assert _bans(cfg, "add", "198.51.100.8")[0] == 0
    with sqlite3.connect(tmp_path / "guard.sqlite3") as conn:
        conn.execute("UPDATE bans SET expires = 1e300")
    rc, out, err = _bans(cfg, "list")
    assert rc == 0, err
    assert "198.51.100.8" in out and "never" in out
    rc, out, _ = _bans(cfg, "list", "--json")
    assert rc == 0 and "198.51.100.8" in out


# -- poisoned ban sources ---------------------------------------------------------------------


async def test_zoned_link_local_sources(tmp_path: Path) -> None:
    """`bans add fe80::1%eth0` stored the zone, and inet_pton refuses zones: the guard could
    then not start at all ("cannot start: illegal IP address string passed to inet_pton")."""
    cfg = _cfg(tmp_path)
    rc, out, _ = await asyncio.to_thread(_bans, cfg, "add", "fe80::1%eth0")
    assert rc == 0 and "banned fe80::1 " in out
    guard = create_guard(cfg)
    await guard.start()
    try:
        assert guard.check("fe80::1") is not None
        assert guard.check("fe80::1%eth0") is not None  # as a socket reports a link-local peer
        for i in range(10):  # a zoned client failing PINs is banned, and nothing raises
            guard.record_pin_failure("fe80::2%eth0", "room", str(i))
        assert guard.check("fe80::2%eth0") is not None
    finally:
        await guard.close()


async def test_store_with_unusable_sources_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records an older version (or a hand edit) left behind are skipped with a warning; the
    other bans stay in force."""
    cfg = _cfg(tmp_path)
    assert (await asyncio.to_thread(_bans, cfg, "add", "192.0.2.10"))[0] == 0
    with sqlite3.connect(tmp_path / "guard.sqlite3") as conn:
        for bad in ("fe80::1%eth0", "not-an-address", "2001:db8::zz"):
            conn.execute(
                "INSERT INTO bans SELECT ?, created, expires, count, failures, reason, 0 "
                "FROM bans WHERE source = '192.0.2.10'",
                (bad,),
            )
        conn.execute("UPDATE meta SET v = v + 1 WHERE k = 'bans_version'")
    caplog.set_level(logging.WARNING, "confedge.guard")
    guard = create_guard(cfg)
    await guard.start()
    try:
        assert guard.check("192.0.2.10") is not None
    finally:
        await guard.close()
    skipped = [r.getMessage() for r in caplog.records if "ignoring a stored ban" in r.getMessage()]
    assert any("fe80::1%eth0" in m for m in skipped) and any("2001:db8::zz" in m for m in skipped)


async def test_redis_with_undecodable_records_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Several instances share Redis: one undecodable value there must not stop every worker's
    ban reloads (it raised out of each poll, logged as "guard sync failed" four times a
    second)."""
    import redis
    from guard_redis import RedisServer

    from confedge.guard import Guard
    from confedge.guard.redis_store import PREFIX, RedisStore

    srv = RedisServer(free_port(37950, 38000))
    srv.start()
    try:
        url = srv.url
        gcfg = replace(_cfg(tmp_path).guard, store=url)
        r = redis.Redis.from_url(url)
        r.hset(PREFIX + "bans", "junk", b"{not json")
        r.hset(PREFIX + "bans", "list", b"[1, 2]")
        r.hset(PREFIX + "bans", "deep", b"[" * 100_000 + b"]" * 100_000)
        r.xadd(PREFIX + "events", {"ts": "yesterday", "kind": "pin", "ip": "192.0.2.1"})
        caplog.set_level(logging.WARNING, "confedge.guard")
        a, b = Guard(gcfg, RedisStore(url)), Guard(gcfg, RedisStore(url))
        await a.start()
        await b.start()
        try:
            for i in range(gcfg.maxretry):
                a.record_pin_failure("198.51.100.44", "room", str(i))
            assert a.check("198.51.100.44") is not None
            for _ in range(40):  # b learns the ban through Redis despite the junk
                if b.check("198.51.100.44") is not None:
                    break
                await asyncio.sleep(0.05)
            assert b.check("198.51.100.44") is not None
        finally:
            await a.close()
            await b.close()
        r.close()
    finally:
        srv.stop()
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"
    assert any("undecodable" in r.getMessage() for r in caplog.records)


def _open_store(path: str, results: Any, barrier: Any) -> None:
    from confedge.guard.sqlite_store import SQLiteStore

    barrier.wait(10)  # all at once, as workers started by one supervisor

    async def run() -> None:
        store = SQLiteStore(path)
        try:
            await store.open()
            await store.salt()
            results.put("ok")
        except Exception as exc:
            results.put(repr(exc))
        finally:
            await store.close()

    asyncio.run(run())


def test_workers_creating_the_database_together(tmp_path: Path) -> None:
    """Proxy workers open the store at the same moment; the open-time integrity check made
    SQLite answer some of them "database is locked" at once (no busy wait), and a worker that
    cannot open its store does not start."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = str(tmp_path / f"r{round_}" / "guard.sqlite3")
        results = ctx.Queue()
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_store, args=(path, results, barrier)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = [results.get(timeout=5) for _ in procs]
        assert outcomes == ["ok"] * len(procs), outcomes
