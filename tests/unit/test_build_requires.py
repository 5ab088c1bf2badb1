"""The wheel build's requirements cover what mypyc must type-check.

Why: setup.py compiles the modules of ``[tool.confedge] compiled`` with mypyc, which runs mypy
over them and every confedge module they import, in pip's build environment, which holds only
``[build-system] requires``. A third-party import missing there (h2, psutil's stubs) stopped
mypyc, and the build quietly fell back to the interpreted modules: ``pip install .`` into a fresh
environment, the README's and the Dockerfile's way, gave the slower proxy. (``make native`` and
an environment that already had the packages hid it: mypy found them outside the build
environment.) This walks the imports statically, so it fails without building anything.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

# Imported name -> the distribution that gives mypy its types (the package itself when it
# ships py.typed or inline types; its stubs package otherwise).
TYPES_FROM = {"psutil": "types-psutil", "h2": "h2", "hpack": "h2", "hyperframe": "h2"}


def _module_file(name: str) -> Path | None:
    base = SRC / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, anywhere in it (mypy follows them all)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # may be modules
    return out


def _third_party_imports_of_compiled() -> dict[str, set[str]]:
    """Top-level third-party module -> the confedge modules that import it, over the compiled
    modules and the confedge modules they import, transitively."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    compiled = config["tool"]["confedge"]["compiled"]
    todo = ["confedge." + p.removesuffix(".py").replace("/", ".") for p in compiled]
    seen: set[str] = set()
    third: dict[str, set[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # mypy also analyses every parent package of a module it reads (their __init__.py).
        todo.extend(module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1))
        path = _module_file(module)
        if path is None:
            continue
        for name in _imports(path, module):
            top = name.split(".")[0]
            if top == "confedge":
                if _module_file(name) is not None:
                    todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third.setdefault(top, set()).add(module)
    return third


def _build_requires() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    names = set()
    for req in config["build-system"]["requires"]:
        m = re.match(r"[A-Za-z0-9_.-]+", req)
        assert m, req
        names.add(m[0].lower().replace("_", "-"))
    return names


def _ignored_by_mypy() -> set[str]:
    """Top-level modules pyproject's mypy overrides let be missing (ignore_missing_imports)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    out: set[str] = set()
    for override in config["tool"]["mypy"].get("overrides", []):
        if override.get("ignore_missing_imports"):
            modules = override["module"]
            for m in [modules] if isinstance(modules, str) else modules:
                out.add(m.split(".")[0])
    return out


def test_every_third_party_import_of_the_compiled_modules_is_a_build_requirement() -> None:
    requires = _build_requires()
    imports = _third_party_imports_of_compiled()
    # The walk reaches them at all (the two that were missing, and one that never was).
    assert {"h2", "psutil", "msgspec"} <= imports.keys(), imports
    ignored = _ignored_by_mypy()
    missing = {
        top: sorted(users)
        for top, users in imports.items()
        if top not in ignored and TYPES_FROM.get(top, top).lower().replace("_", "-") not in requires
    }
    assert not missing, (
        "add these to [build-system] requires in pyproject.toml (their types, for mypyc): "
        f"{missing}"
    )
