"""Running a Playwright driver script (.mjs) against Debian's Chromium, for the e2e tests.

`nodesim_chromium_driver.mjs` (playwright-core driving Debian's /usr/bin/chromium) joins a
conference from the page and prints one JSON line: what the page showed and what getStats saw.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
DRIVER = HERE / "nodesim_chromium_driver.mjs"


def require_browser() -> str:
    """The node binary that runs the driver; skip (with the install command) if anything is missing."""
    node = shutil.which("node")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    if node is None:
        pytest.skip("node is missing (needed to drive Chromium with playwright-core)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is missing: npm install --prefix tests/e2e playwright-core")
    return node


async def run_driver(
    node_bin: str, cfg: dict[str, Any], timeout: float, driver: Path = DRIVER
) -> dict[str, Any]:
    """One browser session (see the driver's header for cfg); its one-line JSON report."""
    proc = await asyncio.create_subprocess_exec(
        node_bin,
        str(driver),
        json.dumps(cfg),
        cwd=str(HERE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the Chromium driver did not finish in time") from None
    lines = out.decode().strip().splitlines()
    assert lines, f"driver printed nothing; stderr: {err.decode()[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result
