#!/usr/bin/env python3
"""Profile a TURN server while the benchmark's load generator relays through it.

    .venv/bin/python bench/turn/profile.py --server confedge --tool py-spy
    .venv/bin/python bench/turn/profile.py --server confedge --tool py-spy-native
    .venv/bin/python bench/turn/profile.py --server coturn --tool perf     # perf record -g

Why: the benchmark says how much slower or faster a server is; this says where the per-packet
time goes (Python frames with py-spy, C and kernel frames with perf), under exactly the load
the benchmark applies. Prints the top frames by self and inclusive samples and keeps the raw
profile in bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loadgen
import run
import servers


def summarize(collapsed: Path, top: int) -> str:
    """Top frames of a collapsed-stack file ("f1;f2;...;leaf count" per line)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    out = [f"{total} samples", "self:"]
    out += [f"  {100 * c / total:5.1f}%  {f[:110]}" for f, c in own.most_common(top)]
    out += ["inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f[:110]}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def perf_collapse(data: Path, out: Path) -> None:
    """perf script output folded into collapsed stacks (leaf last), no external scripts."""
    text = subprocess.run(
        ["perf", "script", "-i", str(data)], capture_output=True, text=True, check=False
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    frames: list[str] = []
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if frames:
                counts[";".join(reversed(frames))] += 1
            frames = []
            continue
        if line.startswith((" ", "\t")):
            parts = line.split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            frames.append(sym.split("+0x")[0].strip())
    out.write_text("".join(f"{k} {v}\n" for k, v in counts.items()))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--server", choices=["confedge", "coturn"], default="confedge")
    ap.add_argument("--tool", choices=["py-spy", "py-spy-native", "perf"], default="py-spy")
    ap.add_argument("--allocs", type=int, default=50)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=0, help="offered pkt/s (0 = as fast as possible)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--coturn-threads", type=int, default=2)
    args = ap.parse_args()
    if args.server == "confedge" and args.tool == "perf":
        print("note: perf shows the interpreter as C frames; py-spy maps them to Python lines")
    lock = open("/tmp/confedge-turnbench.lock", "w")  # noqa: SIM115 - held until exit
    fcntl.flock(lock, fcntl.LOCK_EX)  # never profile while a benchmark run uses the ports
    results = Path(__file__).resolve().parent.parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="confedge-turnprof-"))
    if args.server == "coturn":
        server = servers.start_coturn(run.COTURN, work, args.coturn_threads)
    else:
        server = servers.start_confedge(run.CONFEDGE, work)
    ctx = mp.get_context("fork")
    h = run.Harness(ctx, 1)
    try:
        h.spawn(
            loadgen.Target(
                server.address, servers.USERNAME, servers.PASSWORD, ("127.0.0.1", h.sink_port)
            )
        )
        (reply,) = h.ask([("alloc", args.allocs, run.FULL_STEPS, 32, 30.0, h.source_ip())])
        if reply[2]:
            raise SystemExit(f"allocation setup failed: {reply[6]}")
        h.stop[0] = 0
        h.workers[0][1].send(("blast", args.size, args.rate))
        time.sleep(1.0)
        p0, c0, t0 = h.counts[0], server.cpu_seconds(), time.monotonic()
        raw = results / f"profile-{args.server}-{args.tool}-{stamp}"
        secs = str(int(args.seconds))
        if args.tool.startswith("py-spy"):
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            cmd = [
                pyspy,
                "record",
                "--pid",
                str(server.proc.pid),
                "--duration",
                secs,
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                f"{raw}.txt",
            ]
            if args.tool == "py-spy-native":
                cmd.append("--native")
            subprocess.run(cmd, check=True, capture_output=True)
            collapsed = Path(f"{raw}.txt")
        else:
            subprocess.run(
                [
                    "perf",
                    "record",
                    "-g",
                    "-F",
                    "999",
                    "-p",
                    str(server.proc.pid),
                    "-o",
                    f"{raw}.data",
                    "--",
                    "sleep",
                    secs,
                ],
                check=True,
                capture_output=True,
            )
            collapsed = Path(f"{raw}.txt")
            perf_collapse(Path(f"{raw}.data"), collapsed)
        p1, c1, t1 = h.counts[0], server.cpu_seconds(), time.monotonic()
        h.stop[0] = 1
        h.workers[0][1].recv()
        h.release(1)
    finally:
        h.close()
        server.stop()
    delivered = p1 - p0
    print(
        f"{args.server}: {args.allocs} allocation(s), {args.size} B, delivered "
        f"{delivered / (t1 - t0):,.0f} pkt/s while profiled, "
        f"{(c1 - c0) / max(delivered, 1) * 1e6:.2f} µs server CPU/pkt (profiler overhead included)"
    )
    print(summarize(collapsed, args.top))
    print(f"raw profile: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
