"""The proxy package's import rules (docs/ARCHITECTURE.md, "Code map"), checked where they can
break: the worker (`core.WorkerRuntime`) imports no client adapter at run time, the port-80
adapter does not import the worker, and the status page learns the build without importing an
adapter. Each check runs in a fresh interpreter, so what earlier tests imported cannot hide an
import; the same checks run against the compiled build (`make test-native`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

# The reference source (the compiled build is made from it and may ship no .py files).
PROXY_SRC = Path(__file__).resolve().parents[2] / "src" / "confedge" / "proxy"
# The adapters: protocols over sockets (and the process wiring around them).
ADAPTERS = ("server", "h2", "redirect", "service", "guardcalls", "turnshare")


def _loaded(code: str) -> list[str]:
    """Run `code` in a fresh interpreter, then list which proxy adapters it left imported."""
    probe = (
        f"{code}\nimport sys\n"
        f"print([m for m in {ADAPTERS!r} if 'confedge.proxy.' + m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_redirect_does_not_import_the_worker() -> None:
    """redirect.py (port 80) imports the neutral helpers it shares with the worker (request.py:
    MEMO_SIZE, normalise_peer), not core.py, which would close a circle core -> redirect."""
    code = (
        "import sys, confedge.proxy.redirect\n"
        "assert 'confedge.proxy.core' not in sys.modules, 'redirect imported core'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_worker_drain_and_sessions_import_no_client_adapter(tmp_path: Path) -> None:
    """The worker drains and lists sessions through what each client connection provides
    (core.ClientSide), so running those paths imports neither client adapter."""
    code = f"""
import asyncio
from confedge.config import parse_config
from confedge.proxy.core import WorkerRuntime

async def main():
    cfg = parse_config({{
        "server": {{"state_dir": {str(tmp_path)!r}}},
        "turn": {{"enabled": False}},
        "proxy": {{"nodes": ["http://127.0.0.1:9"]}},
    }})
    core = WorkerRuntime(cfg, asyncio.get_running_loop())
    core.close_idle()
    assert core.sessions() == []
    await core.close()

asyncio.run(main())
"""
    assert _loaded(code) == []


def _runtime_imports(source: str) -> list[str]:
    """Every module `source` imports outside `if TYPE_CHECKING:` blocks, function bodies
    included (for `from m import n`, both m and m.n: n may be a module)."""
    tree = ast.parse(source)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def test_the_import_scan_sees_function_bodies_and_skips_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from confedge.proxy.server import ClientConnection\n"
        "def f():\n    from confedge.proxy import h2\n    import confedge.proxy.redirect\n"
    )
    imported = _runtime_imports(source)
    assert "confedge.proxy.h2" in imported
    assert "confedge.proxy.redirect" in imported
    assert "confedge.proxy.server" not in imported


def test_worker_source_imports_no_adapter_at_run_time() -> None:
    """Also the paths the test above does not run: no import of an adapter anywhere in
    core.py but under TYPE_CHECKING (upstream, which builds the node pools, is allowed)."""
    imported = _runtime_imports((PROXY_SRC / "core.py").read_text())
    bad = [m for m in imported for a in ADAPTERS if m == f"confedge.proxy.{a}"]
    assert bad == []


def test_status_page_build_kind_imports_no_adapter() -> None:
    """admin/ never imports proxy adapters: the snapshot reports the build (compiled or
    interpreted) by locating proxy/server's file, not by importing it."""
    code = (
        "import confedge.admin, confedge.admin.snapshot as s\n"
        "assert s.build_kind() in ('compiled (mypyc)', 'interpreted')"
    )
    assert _loaded(code) == []
    for module in ("confedge.proxy.upstream", "confedge.proxy.core"):
        check = code + f"\nimport sys\nassert {module!r} not in sys.modules, {module!r}"
        subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
