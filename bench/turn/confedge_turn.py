"""Run confedge's TURN service alone from a config file (fallback launcher for the benchmark).

Used only when the package has no `python -m confedge.turn`: it does what that entry point
would, with uvloop, until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from confedge.config import load_config
from confedge.turn.service import TurnService


async def _main(path: str) -> None:
    service = TurnService(load_config(path))
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.close()


if __name__ == "__main__":
    uvloop.run(_main(sys.argv[1]))
