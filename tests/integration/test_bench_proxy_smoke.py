"""bench/proxy at toy size: the proxy benchmarks must keep working as confedge changes.

Why: a benchmark that silently breaks (a renamed config key, an nginx directive the reference
configuration gained, a changed entry point) would be found only when someone runs it for a
release. This runs the wrk comparison for one second per server and the socket-free hot-path
measurement for a few hundred requests, and checks that each produced real measurements.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    """Run bench/proxy/`script` with `args` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "bench/proxy" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _need_nginx_and_wrk() -> None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("wrk"):
        pytest.skip("needs nginx and wrk (apt-get install nginx-light wrk)")


@pytest.mark.timeout(150)
def test_proxy_benchmark_smoke(tmp_path: Path) -> None:
    _need_nginx_and_wrk()
    out = tmp_path / "proxy.json"
    proc = _bench(
        "run.py",
        "--build=interpreted",  # the compiled build has its own suite run (make test-native)
        "--rounds=1",
        "--duration=1",
        "--sse=0",
        "--servers",
        "nginx",
        "confedge",
        "floor",
        "--scenarios",
        "https-status",
        "http-redirect",
        *(["h2-status"] if shutil.which("h2load") else []),
        f"--out={out}",
        timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["build"] in ("interpreted", "compiled (mypyc)")
    assert "| scenario | req/s confedge/nginx |" in proc.stdout
    assert "confedge - floor, µs/req |" in proc.stdout
    scenarios = ["https-status", "http-redirect"]
    if shutil.which("h2load"):
        scenarios.append("h2-status")  # HTTP/2 to clients (proxy/h2.py) against nginx's http2
    for scenario in scenarios:
        # floor.py (the uvloop + TLS stack without HTTP) speaks HTTP/1.1 only.
        assert ("floor" in data["throughput"][scenario]) == (scenario != "h2-status")
        for server in data["throughput"][scenario]:
            m = data["throughput"][scenario][server]["median"]
            assert m["rps"] > 100, (scenario, server, m)
            assert m["non_2xx_3xx"] == 0, (scenario, server, m)  # 200s and 301s
            assert m["socket_errors"] == 0, (scenario, server, m)
            assert m["cpu_us_per_req"] > 0, (scenario, server, m)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", [[], ["--distinct=64"]], ids=["repeated", "distinct"])
def test_hotpath_benchmark_smoke(shape: list[str]) -> None:
    proc = _bench("hotpath.py", "--requests=300", *shape)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"^(interpreted|compiled \(mypyc\)): ([\d.]+) us of proxy work", proc.stdout)
    assert m, proc.stdout
    assert 0 < float(m[2]) < 1000


@pytest.mark.timeout(60)
def test_h2floor_benchmark_smoke() -> None:
    """h2floor.py drives hyper-h2 with the adapter's own settings (proxy.h2.server_config):
    it must answer every request it sends (it exits non-zero otherwise) and print a
    per-request figure with confedge's field checks and with hyper-h2's own."""
    proc = _bench("h2floor.py", "--requests=200", "--hyper-h2-validation")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    on = re.search(r"^hyper-h2 server side: ([\d.]+) us per request", proc.stdout, re.M)
    off = re.search(r"by hyper-h2 itself instead: ([\d.]+) us per request", proc.stdout)
    assert on and off, proc.stdout
    assert 0 < float(on[1]) < 5000 and 0 < float(off[1]) < 5000
    engine = re.search(
        r"^engine python \(hyper-h2\), through proxy.h2engine: ([\d.]+) us", proc.stdout, re.M
    )
    assert engine and 0 < float(engine[1]) < 5000, proc.stdout
    native = re.search(
        r"^engine native (\(libnghttp2 [\d.]+\), through proxy.h2engine: ([\d.]+) us|: not built)",
        proc.stdout,
        re.M,
    )
    assert native, proc.stdout
    bad = _bench("h2floor.py", "--streams=0")
    assert bad.returncode == 2 and "--streams must be 1-100" in bad.stderr


@pytest.mark.timeout(150)
def test_ab_benchmark_smoke(tmp_path: Path) -> None:
    """ab.py, the same-run A/B, at toy size: the source tree against itself, every server's
    rounds and medians in its JSON; a tree without confedge is refused with a clear error."""
    _need_nginx_and_wrk()
    out = tmp_path / "ab.json"
    src = str(REPO / "src")
    proc = _bench(
        "ab.py",
        f"--base={src}",
        f"--new={src}",
        "--rounds=1",
        "--duration=1",
        "--scenarios",
        "https-status",  # (one scenario: the harness is the same for each; run.py's smoke
        f"--out={out}",  # test above covers every scheme)
        timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    seen = {(r["scenario"], r["server"]) for r in data["rounds"]}
    for scenario in ("https-status",):
        for server in ("nginx", "base", "new"):
            assert (scenario, server) in seen
            assert data["median_cpu_us_per_req"][scenario][server] > 0
        assert data["ratio_to_nginx"][scenario]["nginx"] == 1.0
    assert all(r["non_2xx_3xx"] == 0 and r["socket_errors"] == 0 for r in data["rounds"])
    bad = _bench("ab.py", f"--base={tmp_path}", f"--new={src}")
    assert bad.returncode == 2 and "holds no confedge package" in bad.stderr
