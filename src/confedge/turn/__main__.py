"""Run the TURN server alone: ``python -m confedge.turn --config FILE [--json]``.

For benchmarks and browser tests that want only the relay.  Prints one JSON line with
``TurnService.info()`` (plus the bound port) on standard output once listening, then serves until
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

from confedge.config import ConfigError, load_config
from confedge.heap import settle_heap
from confedge.logsetup import setup_service_logging

from .service import TurnService


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _serve(path: str) -> int:
    cfg = load_config(path)
    svc = TurnService(cfg)
    await svc.start()
    settle_heap()
    print(json.dumps(svc.info()), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, _set_done, stop)
    try:
        await stop
    finally:
        stats = svc.stats()
        dataplane = svc.dataplane_stats()
        await svc.close()
        print(json.dumps({"stats": stats, "dataplane": dataplane}), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m confedge.turn", description=__doc__)
    p.add_argument("--config", required=True, help="confedge TOML configuration file")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    setup_service_logging(args.log_level, "%(asctime)s %(name)s %(message)s")
    import uvloop

    try:
        return uvloop.run(_serve(args.config))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
