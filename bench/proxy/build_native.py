#!/usr/bin/env python3
"""Compile confedge's HTTP proxy hot path with mypyc into a separate directory.

Why: the proxy's per-request work is a few dozen small Python functions (parsing callbacks,
vetting, header rebuilding, failover bookkeeping, the access-log line). The code is mypy --strict
clean, so mypyc compiles it to a C extension unchanged; in the proxy benchmark that takes CPU per
proxied HTTPS request from about 2.3x nginx's to about 1.5x (docs/BENCHMARKS.md). The compiled
modules behave exactly like the source (the proxy, guard, admin and demo test suites pass against
them); the pure-Python modules remain the reference and the fallback.

Why a separate directory and not the source tree: an extension module next to its .py wins the
import, so a stale .so in src/ would silently run old code after the next edit. The build copies
the current package to OUT/confedge, compiles the listed modules there, and OUT is then put first
on PYTHONPATH (bench/proxy/run.py --native does this for the confedge it starts). Packaging a
compiled wheel (setuptools' mypycify over the same list) is the production equivalent.

Usage: .venv/bin/python bench/proxy/build_native.py OUT
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "confedge"
MYPYC = Path(sys.executable).parent / "mypyc"

# The modules every proxied request runs through (and the pure helpers they call).
HOT_MODULES = (
    "proxy/server.py",
    "proxy/exchange.py",
    "proxy/upstream.py",
    "proxy/core.py",
    "proxy/request.py",
    "proxy/redirect.py",
    "proxy/accesslog.py",
    "proxy/balancer.py",
    "proxy/pages.py",
    "proxy/health.py",
)


def build(out: Path) -> Path:
    """Copy the package to out/confedge and compile HOT_MODULES there; return out."""
    if not MYPYC.exists():
        raise SystemExit(f"{MYPYC} is missing: pip install mypy (it ships mypyc)")
    pkg = out / "confedge"
    if pkg.exists():
        shutil.rmtree(pkg)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SRC, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(MYPYC), *(f"confedge/{m}" for m in HOT_MODULES)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"mypyc failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    shutil.rmtree(out / "build", ignore_errors=True)
    built = sorted(p.name for p in (pkg / "proxy").glob("*.so"))
    if len(built) != len(HOT_MODULES):
        raise SystemExit(f"mypyc built {len(built)} of {len(HOT_MODULES)} modules: {built}")
    print(
        f"compiled {len(built)} modules into {pkg} in {time.monotonic() - t0:.0f} s",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory to put first on PYTHONPATH")
    args = ap.parse_args(argv)
    build(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
