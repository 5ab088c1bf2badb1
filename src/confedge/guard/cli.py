"""`confedge bans list|add|remove|clear`: the operator's view of the configured guard store.

Why it talks to the store and not to a running process: the store *is* the shared state (every
worker of every instance reloads it within a second), so an operator's change takes effect
everywhere without an admin API, and works while confedge is stopped too. Every change writes
an audit line (logger "confedge.guard.audit"), as automatic bans do; from the command line it is
appended to server.state_dir/audit.log (opcommand.py), and the terminal gets one result line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import TextIO

from confedge.config import Config
from confedge.guard.addresses import normalise_source
from confedge.guard.core import BanRecord, GuardCore
from confedge.guard.service import audit_ban, audit_unban
from confedge.guard.store import GuardStore, StoreError, open_store

__all__ = ["bans_command", "configure_parser", "parse_duration", "run_bans"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Longest manual ban. Without a cap "--time 1e300" stored an expiry no clock can print, and
# every later `bans list` (and the audit line) failed on it; a decade is "for ever" here.
MAX_BAN_SECONDS = 10 * 365 * 86400.0


def parse_duration(text: str) -> float:
    """ "300", "90s", "10m", "2h", "1d" -> seconds; ValueError with the accepted forms."""
    t = text.strip().lower()
    mult = 1.0
    if t and t[-1] in _UNITS:
        mult = _UNITS[t[-1]]
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f'"{text}" is not a duration (seconds, or e.g. "90s", "10m", "2h", "1d")')
    if value > MAX_BAN_SECONDS:
        raise ValueError(f'"{text}" is longer than the longest ban, 10 years ("3650d")')
    return value


def _utc(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # a stored expiry beyond any calendar
        return "never"


def _left(seconds: float) -> str:
    if not seconds < MAX_BAN_SECONDS * 100:  # also inf/nan from a hand-edited store
        return "for ever"
    s = int(max(0.0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _table(bans: list[BanRecord], now: float, out: TextIO) -> None:
    if not bans:
        print("no active bans", file=out)
        return
    rows = [("SOURCE", "REASON", "FAILURES", "OFFENCE", "EXPIRES (UTC)", "LEFT")]
    for b in bans:
        rows.append(
            (
                b.source,
                b.reason,
                str(b.failures),
                str(b.count),
                _utc(b.expires),
                _left(b.expires - now) if b.expires > now else "expired",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


DESCRIPTION = (
    "List, add, remove or clear guard bans in the configured store (guard.store); running "
    "workers pick changes up within a second. Each change is recorded in STATE_DIR/audit.log."
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The actions of `confedge bans` as an argparse tree (cli.py registers the command)."""
    from confedge.opcommand import add_action, add_common_options

    add_common_options(p)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    ls = add_action(
        sub,
        "list",
        "show bans (source, reason, failures, offence, expiry)",
        "Show the active bans: source, reason, failures, offence, expiry, time left.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON array on standard output")
    ls.add_argument(
        "--all", action="store_true", help="include expired bans still remembered for escalation"
    )
    add = add_action(
        sub,
        "add",
        "ban a source (an address or an IPv6 /64)",
        "Ban a source address (or an IPv6 /64) for a while; its requests get 429.",
    )
    add.add_argument("source", help="an IPv4/IPv6 address, or an IPv6 network /64")
    add.add_argument(
        "--time",
        type=str,
        default=None,
        metavar="DURATION",
        help="ban length: seconds or 90s/10m/2h/1d (default: guard.bantime, escalated for a "
        "repeat offender)",
    )
    add.add_argument("--reason", default="", help="free text kept with the ban")
    rm = add_action(
        sub,
        "remove",
        "lift the ban of a source and forget its history",
        "Lift the ban of a source and forget its history (no escalation later).",
    )
    rm.add_argument("source", help="the banned address or IPv6 /64, as `list` shows it")
    add_action(
        sub,
        "clear",
        "lift every ban and forget all failure counts",
        "Lift every ban and forget all failure counts.",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="confedge bans", description=DESCRIPTION)
    configure_parser(p)
    return p


async def _act(cfg: Config, store: GuardStore, args: argparse.Namespace, out: TextIO) -> int:
    now = time.time()
    if args.action == "list":
        bans = sorted(await store.list_bans(), key=lambda b: b.expires)
        if not args.all:
            bans = [b for b in bans if b.expires > now]
        if args.json:
            data = [dict(b.to_json(), seconds_left=max(0.0, b.expires - now)) for b in bans]
            print(json.dumps(data), file=out)
        else:
            _table(bans, now, out)
        return 0
    if args.action == "add":
        source = normalise_source(args.source)
        seconds = parse_duration(args.time) if args.time is not None else None
        core = GuardCore(cfg.guard, rand=lambda: 0.0)  # an operator asked for a length: no jitter
        core.set_bans(await store.list_bans())
        if core.ignored(source.split("/")[0]):
            print(
                f"warning: {source} is in guard.ignore; it is never banned automatically",
                file=sys.stderr,
            )
        reason = "manual" + (f": {args.reason}" if args.reason else "")
        rec = core.manual_ban(source, now, seconds, reason)
        await store.push([], [rec], force=True)
        audit_ban(rec, "operator")
        print(f"banned {rec.source} for {_left(rec.expires - now)} (offence {rec.count})", file=out)
        return 0
    if args.action == "remove":
        source = normalise_source(args.source)
        removed = await store.remove(source)
        if removed is None:
            print(f"{source} is not banned", file=sys.stderr)
            return 1
        audit_unban(removed, "manual")
        print(f"lifted the ban of {source}", file=out)
        return 0
    # clear
    n = await store.clear()
    logging.getLogger("confedge.guard.audit").info("unban all by=manual active=%d", n)
    print(f"cleared {n} active ban(s)", file=out)
    return 0


async def _main(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    store = open_store(cfg)
    try:
        await store.open()
        return await _act(cfg, store, args, out)
    finally:
        await store.close()


def bans_command(cfg: Config, argv: list[str], out: TextIO | None = None) -> int:
    """Run `confedge bans ...` from its arguments; return the exit status (0 ok, 1 failure,
    2 usage)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    return run_bans(cfg, args, out)


def run_bans(cfg: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed `confedge bans ACTION`; return the exit status."""
    out = out or sys.stdout
    if cfg.guard.store == "memory":
        print(
            'confedge bans: guard.store is "memory": bans live only inside the running process; '
            'use "sqlite" or a redis:// URL to manage them from the command line',
            file=sys.stderr,
        )
        return 1
    audit = logging.getLogger("confedge.guard.audit")
    if not logging.getLogger().handlers and not audit.handlers:
        # Run standalone: the audit line must still be written somewhere (not the terminal).
        from confedge.opcommand import setup_command_logging

        setup_command_logging(cfg.server.state_dir)
    try:
        return asyncio.run(_main(cfg, args, out))
    except ValueError as exc:
        print(f"confedge bans: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"confedge bans: {exc}", file=sys.stderr)
        return 1
