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


def assert_loaded_over(result: dict[str, Any], origin: str, proto: str) -> set[str]:
    """The driver's Resource Timing (`nav`, `resources`, see driver_common.mjs): the page and
    every load from `origin` came over `proto` ("h2" or "http/1.1"), the web app's event stream
    among them. Returns the paths loaded from `origin`, for the caller's own checks.

    Why the browser's view: ALPN picks the protocol per connection, and only the browser knows
    which connection each load used (a page over h2 with its EventSource on a second HTTP/1.1
    connection would pass a server-side count).
    """
    diag = json.dumps({k: result.get(k) for k in ("nav", "resources", "error")}, indent=1)
    assert result["nav"]["name"].startswith(origin + "/"), diag
    assert result["nav"]["nextHopProtocol"] == proto, diag
    ours = [r for r in result["resources"] if r["name"].startswith(origin + "/")]
    paths = {r["name"][len(origin) :].split("?")[0] for r in ours}
    assert any(p.endswith("/events") for p in paths), diag
    assert {r["nextHopProtocol"] for r in ours} == {proto}, diag
    return paths
