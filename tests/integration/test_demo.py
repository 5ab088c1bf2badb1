"""`confedge demo` as its user meets it: one command, JSON for scripts, real HTTPS, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def _get(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(
        url,
        method=method,
        headers=headers or {},
        data=b'{"display_name": "Alice"}' if method == "POST" else None,
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def demo(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "confedge",
            "demo",
            "--json",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"demo printed nothing; stderr:\n{proc.stderr.read() if proc.stderr else ''}")
    try:
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def test_demo_json_names_everything_and_serves(demo) -> None:  # type: ignore[no-untyped-def]
    proc, info = demo
    assert set(info) >= {"proxy", "turn", "nodes", "conferences", "status"}
    assert info["proxy"]["https"].startswith("https://127.0.0.1:")
    assert info["proxy"]["http"].startswith("http://127.0.0.1:")
    assert set(info["turn"]) == {"host", "port", "username", "password", "realm", "turns"}
    # TURN over TLS on the HTTPS port (turn.tls_on_https in the demo).
    https_port = info["proxy"]["https"].rstrip("/").rsplit(":", 1)[1]
    assert info["turn"]["turns"] == f"turns:127.0.0.1:{https_port}?transport=tcp"
    assert len(info["nodes"]) == 3
    pins = {c["alias"]: c["pin"] for c in info["conferences"]}
    assert pins["open"] is None and pins["meet"]

    base = info["proxy"]["https"].rstrip("/")
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status, _ = _get(base + "/api/client/v2/status")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200

    # A wrong PIN is refused by the node, through the proxy.
    status, body = _get(
        base + "/api/client/v2/conferences/meet/request_token",
        method="POST",
        headers={"pin": "0000", "Content-Type": "application/json"},
    )
    assert (status, json.loads(body)) == (403, {"status": "success", "result": "Invalid PIN"})
    status, body = _get(
        base + "/api/client/v2/conferences/meet/request_token",
        method="POST",
        headers={"pin": pins["meet"], "Content-Type": "application/json"},
    )
    assert status == 200 and json.loads(body)["result"]["token"]
    status, body = _get(base + "/webapp/")
    assert status == 200 and b"<html" in body
    status, body = _get(info["status"])
    assert status == 200 and b"confedge" in body

    # Ctrl-C stops everything cleanly.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    for part in ("proxy stopped", "turn stopped", "guard stopped", "node1 stopped"):
        assert part in err
