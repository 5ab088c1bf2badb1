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

from confedge.demo import DemoPorts
from ports import demo_port_base


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
    """`confedge demo --json --port-base N`: every port moved off the demo's defaults, so that
    this runs beside a demo (and beside other tests)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = demo_port_base()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "confedge",
            "demo",
            "--json",
            "--state-dir",
            str(tmp_path / "state"),
            "--port-base",
            str(base),
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
        yield proc, json.loads(line), base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def test_demo_json_names_everything_and_serves(demo) -> None:  # type: ignore[no-untyped-def]
    proc, info, base = demo
    assert set(info) >= {"proxy", "turn", "nodes", "conferences", "status"}
    # Every port derived from --port-base, the turns: one named too.
    ports = DemoPorts.from_base(base)
    assert info["proxy"] == {
        "https": f"https://127.0.0.1:{ports.https}/",
        "http": f"http://127.0.0.1:{ports.http}/",
    }
    assert set(info["turn"]) == {
        "host",
        "port",
        "tls_port",
        "username",
        "password",
        "realm",
        "turns",
    }
    assert (info["turn"]["port"], info["turn"]["tls_port"]) == (ports.turn, ports.turns)
    assert info["nodes"] == [f"http://127.0.0.1:{p}" for p in ports.nodes]
    assert info["status"] == f"http://127.0.0.1:{ports.status}/status"
    assert (base + 4, base + 5, base + 7) == (ports.status, ports.nodes[0], ports.nodes[-1])
    assert f'relay_ports = "{base + 100}-{base + 1099}"' in Path(info["config"]).read_text()
    # TURN over TLS on the HTTPS port (turn.tls_on_https in the demo).
    assert info["turn"]["turns"] == f"turns:127.0.0.1:{ports.https}?transport=tcp"
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


def test_demo_answers_drain_and_reload_from_the_operator_commands(demo) -> None:  # type: ignore[no-untyped-def]
    """`confedge drain --config STATE/demo.toml` finds the demo by its pid file; the demo had
    no SIGUSR1/SIGUSR2 handlers, so their default action killed it while the command said
    "drain cancelled". Now it answers like `confedge run`, and a drain can be cancelled."""
    proc, info, _ = demo
    config = info["config"]

    def confedge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "confedge", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=30,
        )

    out = confedge("drain", "--cancel")
    assert out.returncode == 0 and "nothing to cancel: it is serving" in out.stdout, out
    assert confedge("reload").returncode == 0
    out = confedge("drain")
    assert out.returncode == 0 and out.stdout.startswith("draining (pid"), out
    out = confedge("drain", "--cancel")
    assert out.returncode == 0 and out.stdout.startswith("drain cancelled"), out
    assert proc.poll() is None
