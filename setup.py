"""Build hook: compile confedge's proxy hot path with mypyc and the native TURN data plane (C)
when a wheel is built.

Why: a proxied HTTPS request runs a few dozen small Python functions (parsing callbacks, vetting,
header rebuilding, failover bookkeeping, the access-log line). They are mypy --strict clean, so
mypyc compiles them to C unchanged, which cuts the proxy's CPU per request by about a quarter
(docs/BENCHMARKS.md). Everything else in confedge stays interpreted.

When:
* `pip install .` / `pip wheel .` (a wheel build): the modules listed under [tool.confedge]
  compiled in pyproject.toml are compiled;
* `pip install -e .` (what `make venv` does for development): nothing is compiled, so an edit
  to a .py file takes effect at once (a stale extension next to its .py would win the import);
* CONFEDGE_PURE=1 in the environment: nothing is compiled.

If compiling fails (no C compiler, no Python headers), the build says so on standard error and
installs the same modules uncompiled: confedge behaves the same, only slower. `confedge check`
and the proxy's start-up log line say which build is running.

The native TURN data plane (`src/confedge/turn/_native.c`, a plain C extension, Linux only) is
built with the wheel too, and on its own by `python setup.py build_ext --inplace` (what
`make venv` runs after the editable install when a C compiler is there: the extension has no
.py twin, so an in-place build shadows nothing; the proxy modules are not compiled then). When
it is missing, `turn.dataplane = "auto"` falls back to the pure-Python relay (docs/TURN.md).
CONFEDGE_NATIVE_CFLAGS adds compiler flags (e.g. "-fsanitize=address -O1 -g" for the fuzz run).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE = "confedge.turn._native"
H2NATIVE = "confedge.proxy._h2native"
H1NATIVE = "confedge.proxy._h1native"


def _wanted() -> bool:
    if os.environ.get("CONFEDGE_PURE", "") not in ("", "0"):
        return False
    # Editable installs and metadata-only steps (egg_info, sdist, dist_info) compile nothing.
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
        return False
    return any(cmd in sys.argv for cmd in ("bdist_wheel", "build_ext", "build", "install"))


def _native_ext() -> list[Any]:
    """The C data plane of TURN (epoll, recvmmsg/sendmmsg and UDP GSO are Linux APIs)."""
    if not _wanted() or not sys.platform.startswith("linux"):
        return []
    flags = ["-O2", "-std=gnu11", "-Wall", "-fno-strict-aliasing"]
    flags += os.environ.get("CONFEDGE_NATIVE_CFLAGS", "").split()
    exts = [
        Extension(
            NATIVE,
            ["src/confedge/turn/_native.c"],
            extra_compile_args=flags,
            extra_link_args=[f for f in flags if f.startswith("-fsanitize")],
        ),
        # The ordinary HTTP/1.1 head in one C pass (proxy/h1engine.py); httptools otherwise.
        Extension(
            H1NATIVE,
            ["src/confedge/proxy/_h1native.c"],
            extra_compile_args=flags,
            extra_link_args=[f for f in flags if f.startswith("-fsanitize")],
        ),
    ]
    # HTTP/2 framing on libnghttp2 (proxy/h2engine.py); hyper-h2 serves when it is not built.
    if _have_nghttp2():
        exts.append(
            Extension(
                H2NATIVE,
                ["src/confedge/proxy/_h2native.c"],
                extra_compile_args=flags,
                extra_link_args=[f for f in flags if f.startswith("-fsanitize")],
                libraries=["nghttp2"],
            )
        )
    else:
        print(
            "confedge: libnghttp2-dev is missing: HTTP/2 to clients uses hyper-h2 (pure Python, "
            "several times the CPU per request; apt install libnghttp2-dev, then reinstall)",
            file=sys.stderr,
        )
    return exts


def _have_nghttp2() -> bool:
    """libnghttp2's header is there (Debian: libnghttp2-dev; the library itself, libnghttp2-14,
    is on every Debian system that has curl)."""
    import sysconfig

    dirs = ["/usr/include", "/usr/local/include", sysconfig.get_paths().get("include", "")]
    dirs += os.environ.get("CPATH", "").split(os.pathsep)
    return any(d and os.path.exists(os.path.join(d, "nghttp2", "nghttp2.h")) for d in dirs)


def _ext_modules() -> list[Any]:
    # `build_ext --inplace` (make venv) builds only the TURN extension: compiled proxy modules
    # next to their .py files in the source tree would shadow every later edit.
    if not _wanted() or "--inplace" in sys.argv:
        return []
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["confedge"]["compiled"]
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("confedge: mypyc is missing; building without compiled modules", file=sys.stderr)
        return []
    try:
        # Two groups, each its own shared library: the TURN server (`python -m confedge.turn`,
        # or `confedge run` with the proxy off) then maps only the TURN control plane's code,
        # not the proxy's (about 1.6 MiB of resident pages, docs/BENCHMARKS.md).
        paths = [f"src/confedge/{m}" for m in modules]
        turn = [p for p in paths if p.startswith(("src/confedge/turn/", "src/confedge/stun/"))]
        rest = [p for p in paths if p not in turn]
        groups = [(g, name) for g, name in ((rest, "confedge_proxy"), (turn, "confedge_turn")) if g]
        return list(mypycify(paths, opt_level="3", separate=groups))
    except (Exception, SystemExit) as exc:  # mypy's type check failed (it exits) or mypyc broke
        print(
            f"confedge: preparing the compiled hot path failed ({exc!r}); "
            "building without compiled modules (same behaviour, more CPU per request)",
            file=sys.stderr,
        )
        return []


def _build_bpf(build_lib: str, inplace: bool) -> None:
    """The kernel offload's eBPF object (turn.offload, docs/TURN.md), when clang is there."""
    import shutil
    import subprocess

    src = "src/confedge/turn/bpf/relay.bpf.c"
    out = src[:-2] + ".o" if inplace else os.path.join(build_lib, "confedge/turn/bpf/relay.bpf.o")
    clang = shutil.which("clang")
    if clang is None or not os.path.exists(src):
        print(
            "confedge: no clang: the eBPF relay offload is not built (turn.offload stays in "
            "user space; apt install clang libbpf-dev)",
            file=sys.stderr,
        )
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [
        clang,
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-I/usr/include/x86_64-linux-gnu",
        "-c",
        src,
        "-o",
        out,
    ]
    if subprocess.run(cmd, check=False).returncode != 0:
        print(
            "confedge: compiling the eBPF relay offload failed; turn.offload stays in user space",
            file=sys.stderr,
        )


class OptionalBuildExt(build_ext):
    """A failed C build leaves the pure-Python modules in place instead of failing the install."""

    failed: set[str] = set()

    def build_extension(self, ext: Any) -> None:
        if ext.name not in (NATIVE, H2NATIVE, H1NATIVE):
            super().build_extension(ext)  # mypyc: a failure drops them all (run() below)
            return
        try:
            super().build_extension(ext)
        except Exception as exc:  # CCompilerError, DistutilsExecError, PlatformError, OSError
            self.failed = self.failed | {ext.name}
            fallback = {
                NATIVE: 'turn.dataplane = "auto" will use the pure-Python relay (same behaviour, '
                "more CPU per packet)",
                H2NATIVE: 'proxy.http2_engine = "auto" will use hyper-h2 (same behaviour, more '
                "CPU per request)",
                H1NATIVE: 'proxy.http1_engine = "auto" will read every HTTP/1.1 head with '
                "httptools (same behaviour, more CPU per request)",
            }[ext.name]
            print(f"confedge: compiling {ext.name} failed ({exc}); {fallback}", file=sys.stderr)

    def copy_extensions_to_source(self) -> None:
        # `build_ext --inplace`: a native extension that failed to build has nothing to copy.
        self.extensions = [e for e in self.extensions if e.name not in self.failed]
        super().copy_extensions_to_source()

    def run(self) -> None:
        _build_bpf(self.build_lib, self.inplace)
        try:
            super().run()
        except Exception as exc:  # CCompilerError, DistutilsExecError, PlatformError, OSError
            print(
                f"confedge: compiling the proxy hot path failed ({exc}); "
                "installing it uncompiled (same behaviour, more CPU per request)",
                file=sys.stderr,
            )
            self.extensions = []


setup(ext_modules=_native_ext() + _ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
