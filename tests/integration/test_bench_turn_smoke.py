"""bench/turn/run.py end to end at toy size: the benchmark must keep working as confedge changes.

Why: a benchmark that silently breaks (a renamed config key, a changed entry point, a codec
slip) would report "0 packets" or crash only when someone finally runs it for a release. This
runs every scenario for a fraction of a second against confedge (and coturn when installed)
and checks that each one produced real, well-formed measurements.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--relay-multiplex=4"]], ids=["own-ports", "multiplex"])
def test_turn_benchmark_smoke(tmp_path: Path, extra: list[str]) -> None:
    servers = "coturn,confedge" if shutil.which("turnserver") else "confedge"
    out = tmp_path / "turn.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/turn/run.py"),
            "--servers",
            servers,
            "--rounds=1",
            "--window=0.3",
            "--warmup=0.2",
            "--alloc-count=40",
            "--alloc-batches=1",
            "--rss-allocs=40",
            "--paced-rates=2000",
            "--settle=0.2",
            "--lock-timeout=30",
            f"--out={out}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    if proc.returncode == 75:
        pytest.skip("a full TURN benchmark run holds the host's benchmark lock (it owns the ports)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "| metric (median of rounds) | coturn | confedge | confedge/coturn |" in proc.stdout
    for name in servers.split(","):
        (r,) = data["results"][name]
        for key in ("relay_1x200", "relay_1x1200", "relay_50x200", "relay_50x1200"):
            sc = r[key]
            assert "error" not in sc, (name, key, sc)
            assert sc["delivered_pps"] > 0, (name, key, sc)
            # Every packet counted at the sink carried exactly the offered payload.
            assert sc["delivered_mean_bytes"] == sc["payload"], (name, key, sc)
            assert sc["server_cpu_us_per_pkt"] is not None
        paced = r["paced_50x200_2000"]
        assert "error" not in paced, (name, paced)
        assert 1000 < paced["offered_pps"] < 3000, (name, paced)
        assert r["alloc_rate"]["completed"] == 40, (name, r["alloc_rate"])
        assert r["memory"]["allocations"] == 40, (name, r["memory"])
        assert r["memory"]["rss_mib"] > 1
    if extra:  # confedge relayed through its shared sockets, and every peer had one owner
        dataplane = data["results"]["confedge"][0]["server_exit_stats"]["dataplane"]
        assert dataplane["mux_sockets"] >= 4, dataplane
        assert dataplane["drop_mux_conflict"] == dataplane["drop_mux_ambiguous"] == 0, dataplane
