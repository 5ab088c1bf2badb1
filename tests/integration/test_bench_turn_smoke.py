"""bench/turn/run.py end to end at toy size: the benchmark must keep working as confedge changes.

Why: a benchmark that silently breaks (a renamed config key, a changed entry point, a codec
slip) would report "0 packets" or crash only when someone finally runs it for a release. This
runs every scenario for a fraction of a second against confedge (and coturn when installed)
and checks that each one produced real, well-formed measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_toy(
    tmp_path: Path, servers: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """run.py at toy size; skips when a full run holds the benchmark lock."""
    out = tmp_path / "turn.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/turn/run.py"),
            "--servers",
            servers,
            *extra,
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
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode == 75:
        pytest.skip("a full TURN benchmark run holds the host's benchmark lock (it owns the ports)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--relay-multiplex=4"]], ids=["own-ports", "multiplex"])
def test_turn_benchmark_smoke(tmp_path: Path, extra: list[str]) -> None:
    servers = "coturn,confedge" if shutil.which("turnserver") else "confedge"
    proc, out = _run_toy(tmp_path, servers, "--generator=python", *extra)
    data = json.loads(out.read_text())
    assert data["generator"] == "python"
    assert "| metric (median of rounds) | coturn | confedge | confedge/coturn |" in proc.stdout
    for name in servers.split(","):
        (r,) = data["results"][name]
        for key in ("relay_1x200", "relay_1x1200", "relay_50x200", "relay_50x1200"):
            sc = r[key]
            assert "error" not in sc, (name, key, sc)
            assert sc["delivered_pps"] > 0, (name, key, sc)
            # Every packet counted at the sink carried exactly the offered payload.
            assert abs(sc["delivered_mean_bytes"] - sc["payload"]) < 1, (name, key, sc)
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


@pytest.mark.timeout(120)
@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (cc) for bench/turn/turnload.c")
def test_turn_benchmark_c_generator_smoke(tmp_path: Path) -> None:
    """The C sender and sink (turnload.c, built by the bench) drive every relay scenario.

    Why: the kernel-offload comparison (issue 17) rests on this generator; a break in its build,
    its fd hand-over or its shared counters must fail here, not in the lead's release run.
    """
    build = tmp_path / "build"  # a fresh build directory: the bench compiles turnload itself
    proc, out = _run_toy(
        tmp_path, "confedge", "--generator=c", env={"TURNLOAD_BUILD_DIR": str(build)}
    )
    assert "load generator: c" in proc.stdout
    assert (build / "turnload").is_file()
    data = json.loads(out.read_text())
    assert data["generator"] == "c"
    for size in ("200", "1200"):
        ceiling = data["generator_ceiling"][size]
        assert ceiling["delivered_pps"] > 0, ceiling
        assert abs(ceiling["delivered_mean_bytes"] - int(size)) < 1, ceiling
    (r,) = data["results"]["confedge"]
    for key in ("relay_1x200", "relay_1x1200", "relay_50x200", "relay_50x1200"):
        sc = r[key]
        assert "error" not in sc, (key, sc)
        assert sc["delivered_pps"] > 0, (key, sc)
        # ChannelData came through the server: the sink saw the payload, not the 4 bytes longer
        # frame (within a byte: the counters are sampled while the sink adds to them).
        assert abs(sc["delivered_mean_bytes"] - sc["payload"]) < 1, (key, sc)
        # The C processes' CPU is found and subtracted: attributable <= whole machine.
        assert sc["loadgen_cpu_util"] > 0, (key, sc)
        assert sc["generator_cpu_s"] > 0, (key, sc)
        assert 0 <= sc["attributable_cpu_us_per_pkt"] <= sc["machine_cpu_us_per_pkt"], (key, sc)
    paced = r["paced_50x200_2000"]
    assert "error" not in paced, paced
    assert 1000 < paced["offered_pps"] < 3000, paced
    assert "server-attributable CPU µs/pkt" in proc.stdout
    # The host's state, measured before and after the rounds (turnload calib).
    for when in ("before", "after"):
        c = data["host_calibration"][when]
        assert 10 < c["syscall_ns"] < c["udp_send_recv_ns"] < 1_000_000, c
        assert f"host {when} the rounds: a system call " in proc.stdout
    assert "host: a system call " in proc.stdout


def test_calibration_says_why_when_it_cannot_measure(tmp_path: Path) -> None:
    """cgen.calibrate: a binary that fails or prints something else gives a reason, which the
    run prints and records in place of the figures, instead of a traceback."""
    sys.path.insert(0, str(REPO / "bench/turn"))
    try:
        import cgen
    finally:
        sys.path.remove(str(REPO / "bench/turn"))
    fails = cgen.calibrate(Path(shutil.which("false") or "/bin/false"))
    assert isinstance(fails, str) and fails.startswith("turnload calib exited 1"), fails
    chatty = tmp_path / "chatty"
    chatty.write_text("#!/bin/sh\necho hello\n")
    chatty.chmod(0o755)
    assert cgen.calibrate(chatty) == "turnload calib printed 'hello'"
    missing = cgen.calibrate(tmp_path / "nowhere")
    assert isinstance(missing, str) and "No such file" in missing, missing


@pytest.mark.timeout(120)
@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (cc) for bench/turn/turnload.c")
@pytest.mark.skipif(os.geteuid() != 0, reason="--gen-packet needs root (AF_PACKET, unshare --net)")
def test_turn_benchmark_packet_generator_smoke(tmp_path: Path) -> None:
    """`--gen-packet`: the C sender writes ChannelData frames into lo with AF_PACKET, in the
    run's own network namespace, and every server still relays them to the sink.

    Why: the frames are hand-built (IPv4 and UDP headers, checksums, each socket's 5-tuple); a
    wrong byte makes the kernel drop every one silently and the bench report 0 pkt/s. Checking
    that the sink got exactly the payload proves the server (or the offload) took each frame as
    the allocation's ChannelData. The offload takes part: its rewritten packets (from the
    relay's own address) must pass the namespace's input route check too.
    """
    servers = ("coturn," if shutil.which("turnserver") else "") + "confedge,confedge-ebpf"
    proc, out = _run_toy(
        tmp_path,
        servers,
        "--generator=c",
        "--gen-packet",
        "--only=relay",
        env={"TURNLOAD_BUILD_DIR": str(tmp_path / "build")},
    )
    assert "running in a private network namespace" in proc.stdout
    data = json.loads(out.read_text())
    assert data["args"]["gen_packet"] == "True"
    for size in ("200", "1200"):
        ceiling = data["generator_ceiling"][size]
        assert ceiling["delivered_pps"] > 0, ceiling
        # approx: the sink adds a batch's packets and bytes to two slots one after the other,
        # so a window edge can fall between them (off by a fraction of a packet, not 4 bytes).
        assert ceiling["delivered_mean_bytes"] == pytest.approx(int(size), rel=1e-3), ceiling
    for name in servers.split(","):
        (r,) = data["results"][name]
        for key in ("relay_1x200", "relay_1x1200", "relay_50x200", "relay_50x1200"):
            sc = r[key]
            assert "error" not in sc, (name, key, sc)
            assert sc["offered_pps"] > 0 and sc["delivered_pps"] > 0, (name, key, sc)
            # ChannelData header stripped from every packet (204 B would fail; approx as above)
            assert sc["delivered_mean_bytes"] == pytest.approx(sc["payload"], rel=1e-3), sc


def test_without_a_compiler_the_bench_says_so_and_uses_python(tmp_path: Path) -> None:
    """No C compiler: the default falls back to the Python generator with a message naming
    the fix; `--generator c` refuses to start with the same reason.  (`--servers nope` stops
    the run right after the generator is chosen, so no server is started.)"""
    env = {
        **os.environ,
        "TURNLOAD_BUILD_DIR": str(tmp_path / "build"),
        "CC": str(tmp_path / "no-such-cc"),
    }
    run = [sys.executable, str(REPO / "bench/turn/run.py"), "--servers", "nope"]
    fallback = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert "C load generator unavailable, using the Python one: no C compiler" in fallback.stdout
    assert "apt-get install gcc, or set CC" in fallback.stdout
    assert "load generator: python" in fallback.stdout
    forced = subprocess.run(
        [*run, "--generator", "c"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert forced.returncode == 2
    assert "--generator c: no C compiler" in forced.stderr
    assert not (tmp_path / "build" / "turnload").exists()
