#!/usr/bin/env python3
"""Same-run A/B of two confedge trees against nginx: CPU per request, alternating rounds.

Why: on the shared VM the CPU per request of *both* servers moves with the load of the machine
(nginx measured 13-20 µs per HTTPS request on different runs of the same day), so a change to
the hot path is judged against the tree before it in the same run, next to the same nginx, not
against a figure of another day. Uses run.py's servers, load tools and CPU accounting.

Each of BASE and NEW is put first on PYTHONPATH of its own `confedge run`: a compiled build
(`make native` makes build/native; copy it away first to keep a baseline) or a source tree's
`src` directory (interpreted). Example (the before/after table of docs/BENCHMARKS.md):

    .venv/bin/python bench/proxy/ab.py --base /tmp/base/build/native --new build/native \\
        --rounds 3 --duration 10 --scenarios https-status https-1k http-redirect

`--base-env` / `--new-env NAME=VALUE` give one side its own environment variables, so that one
tree can be compared with itself under two settings (e.g. `--base-env CONFEDGE_H1_ENGINE=python`).

Prints one line per round and the medians with their ratio to nginx, and writes every round
and the medians to a JSON file (`--out`, default bench/results/proxy-ab-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # bench/proxy/run.py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="tree A, first on PYTHONPATH")
    ap.add_argument("--new", type=Path, required=True, help="tree B, first on PYTHONPATH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--scenarios", nargs="*", default=["https-status", "https-1k", "http-redirect"])
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/proxy-ab-*.json)")
    for side in ("base", "new"):
        ap.add_argument(
            f"--{side}-env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"an environment variable for the {side} confedge only (repeatable), e.g. "
            "CONFEDGE_H1_ENGINE=python to compare two settings of one tree",
        )
    args = ap.parse_args()
    envs: dict[str, dict[str, str]] = {}
    for side in ("base", "new"):
        pairs = getattr(args, f"{side}_env")
        bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
        if bad:
            ap.error(f"--{side}-env wants NAME=VALUE, not {bad}")
        envs[side] = dict(p.split("=", 1) for p in pairs)
    unknown = [sc for sc in args.scenarios if sc not in bench.SCENARIOS]
    if unknown or args.rounds < 1 or args.duration < 1:
        ap.error(
            f"unknown scenario(s) {unknown} (known: {', '.join(bench.SCENARIOS)})"
            if unknown
            else "--rounds and --duration must be at least 1"
        )
    for tree in (args.base, args.new):
        if not (tree / "confedge" / "__init__.py").exists():
            ap.error(f"{tree} holds no confedge package (a build/native copy or a src tree)")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rounds: list[dict[str, Any]] = []

    bench._pick_ports()
    work = Path(tempfile.mkdtemp(prefix="confedge-bench-ab-"))
    bench.make_cert(work)
    s = bench.Servers(work, 0, 8192)
    procs = []
    try:
        s.start_upstreams()
        servers = {"nginx": (bench.NGX_HTTP, bench.NGX_HTTPS, s.start_nginx(bench.UP_PORTS).pid)}
        picked = frozenset(
            (*bench.UP_PORTS, *bench.SSE_PORTS, bench.NGX_HTTP, bench.NGX_HTTPS, bench.CE_MGMT)
        )
        ports = bench.free_ports(6, taken=picked | {bench.CE_HTTP, bench.CE_HTTPS})
        for k, (name, tree) in enumerate((("base", args.base), ("new", args.new))):
            bench.CE_HTTP, bench.CE_HTTPS, bench.CE_MGMT = ports[3 * k : 3 * k + 3]
            s.native = tree.resolve()
            s.w = work / name
            s.w.mkdir()
            shutil.copy(work / "cert.pem", s.w)
            shutil.copy(work / "key.pem", s.w)
            saved = {n: os.environ.get(n) for n in envs[name]}
            os.environ.update(envs[name])  # (start_confedge passes os.environ on)
            try:
                proc = s.start_confedge(bench.UP_PORTS)
            finally:
                for n, v in saved.items():
                    if v is None:
                        os.environ.pop(n, None)
                    else:
                        os.environ[n] = v
            procs.append(s.procs.pop("confedge"))
            servers[name] = (bench.CE_HTTP, bench.CE_HTTPS, proc.pid)
        cpu: dict[tuple[str, str], list[float]] = {}
        for sc in args.scenarios:
            scheme, path, _ = bench.SCENARIOS[sc]
            for http, https, pid in servers.values():  # warm-up
                tool, url = bench._load(scheme, http, https, path)
                tool(url, 2, 64, 2, pid)
            for rnd in range(args.rounds):
                order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
                for name in order:
                    http, https, pid = servers[name]
                    tool, url = bench._load(scheme, http, https, path)
                    r = tool(url, args.duration, 64, 2, pid)
                    cpu.setdefault((sc, name), []).append(r["cpu_us_per_req"])
                    rounds.append({"scenario": sc, "round": rnd + 1, "server": name, **r})
                    print(
                        f"{sc} round {rnd + 1} {name}: {r['cpu_us_per_req']} µs/req, "
                        f"{r['rps']:.0f} req/s, errors {r['non_2xx_3xx'] + r['socket_errors']}",
                        flush=True,
                    )
        print(f"load average {os.getloadavg()}")
        medians: dict[str, dict[str, float]] = {}
        for sc in args.scenarios:
            ngx = statistics.median(cpu[(sc, "nginx")])
            medians[sc] = {name: statistics.median(cpu[(sc, name)]) for name in servers}
            cells = [f"{name} {m:.2f} ({m / ngx:.2f}x)" for name, m in medians[sc].items()]
            print(f"{sc}: " + ", ".join(cells))
        out = args.out or (
            bench.ROOT / "bench" / "results" / f"proxy-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started": started,
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "load_average": os.getloadavg(),
            "rounds": rounds,
            "median_cpu_us_per_req": medians,
            "ratio_to_nginx": {
                sc: {name: m / by["nginx"] for name, m in by.items()} for sc, by in medians.items()
            },
        }
        out.write_text(json.dumps(result, indent=2))
        print(f"results: {out}", file=sys.stderr)
    finally:
        s.stop_all()
        for p in procs:
            bench._stop(p)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
