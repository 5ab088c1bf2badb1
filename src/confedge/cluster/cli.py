"""`confedge cluster list`: the instances sharing this edge's `cluster.store`, from the shell.

Reads the registry straight from Redis (docs/SCALING.md), so it works on a host whose own edge is
stopped, and says so when Redis does not answer rather than showing an empty cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import TextIO

from confedge.cluster.core import InstanceRecord, secret_fingerprint
from confedge.config import Config

__all__ = ["DESCRIPTION", "configure_parser", "run_cluster"]

DESCRIPTION = (
    "The instances that share cluster.store: state, TURN listener, allocations, when each last "
    "published, and whether its REST secret matches this configuration's."
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    from confedge.opcommand import add_action, add_common_options

    add_common_options(p)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    ls = add_action(sub, "list", "list the instances in the registry", DESCRIPTION)
    ls.add_argument(
        "--json", action="store_true", help="one JSON array of the records on standard output"
    )


def _table(recs: list[InstanceRecord], cfg: Config, now: float, out: TextIO) -> None:
    mine = secret_fingerprint(cfg.turn.secrets) if cfg.turn.mode == "permissive" else ""
    rows = [("instance", "state", "turn", "allocations", "updated", "rest secret")]
    for r in recs:
        same = "same" if r.fingerprint == mine else "differs"
        age = f"{max(0.0, now - r.updated):.1f}s ago"
        rows.append((r.instance, r.state, r.turn or "-", str(r.allocation_count), age, same))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def run_cluster(cfg: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed `confedge cluster ACTION`; return the exit status (0 ok, 1 failure)."""
    from redis.exceptions import RedisError

    from confedge.cluster.service import read_registry
    from confedge.redisclient import RedisSetupError

    out = out or sys.stdout
    if not cfg.cluster.store:
        print(
            "confedge cluster: cluster.store is empty, so this edge is alone; set it to the "
            'Redis URL the edges share (e.g. "redis://10.0.0.5:6379/0")',
            file=sys.stderr,
        )
        return 1
    try:
        recs = asyncio.run(asyncio.wait_for(read_registry(cfg.cluster.store), 5.0))
    except (RedisSetupError, RedisError, OSError, TimeoutError) as exc:
        from confedge.admin.snapshot import mask_url

        print(
            f"confedge cluster: {mask_url(cfg.cluster.store)}: {exc or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        json.dump([asdict(r) for r in recs], out, indent=2)
        print(file=out)
    elif not recs:
        print("no instance has published to the registry (none running, or TTL passed)", file=out)
    else:
        _table(recs, cfg, time.time(), out)
    return 0
