"""The host's addresses are re-read while TURN runs: an address added to an interface becomes a
refused peer, and one removed a peer again (issue 11; README "confedge's own addresses are always
refused").  Real kernel: the relay runs in a network namespace of its own (named after this
branch, removed on the way out) where the test adds and removes an address on ``lo``.

The refresh interval is shortened to 1 s through ``TurnService(host_addresses=...)`` (60 s in
production); everything else is the running service and a client on real sockets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2",
)

NEW = "198.51.100.77"

# Runs inside the namespace: prints one line per check, waits for the test between steps.
SCRIPT = textwrap.dedent(
    f"""
    import asyncio, sys
    from confedge.turn.service import HostAddressWatch, TurnService
    from confedge.turn.testing import UdpTurnClient, response_code, turn_config

    async def main():
        svc = TurnService(turn_config(), host_addresses=HostAddressWatch(interval=1.0))
        await svc.start()
        i = svc.info()
        cli = UdpTurnClient((svc.host, svc.port), i["username"], i["password"], i["realm"])
        resp = await cli.allocate()
        print("allocate", response_code(resp), flush=True)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            print("permission", await cli.create_permission("{NEW}"), flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)  # the test changes lo
            await asyncio.sleep(2.5)  # two refresh intervals
        print("permission", await cli.create_permission("{NEW}"), flush=True)
        cli.close()
        await svc.close()

    asyncio.run(main())
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def test_address_added_to_an_interface_becomes_a_refused_peer() -> None:
    ns = f"h11turn-ns{os.getpid()}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
            _ip("-n", ns, "addr", "add", f"{NEW}/32", "dev", "lo")
            proc.stdin.write("\n")
            proc.stdin.flush()
            lines.append(proc.stdout.readline().strip())
            _ip("-n", ns, "addr", "del", f"{NEW}/32", "dev", "lo")
            proc.stdin.write("\n")
            proc.stdin.flush()
            lines.append(proc.stdout.readline().strip())
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert lines == [
            "allocate 200",
            "permission 200",  # an ordinary peer
            "permission 403",  # now an address of this host
            "permission 200",  # gone again
        ], err[-2000:]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
