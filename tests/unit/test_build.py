"""Which build of the proxy hot path a test run exercises (setup.py, Makefile `test-native`).

`make test` runs every suite on the interpreted source (the editable install), then the proxy's
suites again with the compiled wheel build first on PYTHONPATH and CONFEDGE_EXPECT_BUILD=compiled.
This test makes that second run fail loudly if it silently fell back to the interpreted modules
(a stale PYTHONPATH, a failed compile), instead of passing without testing what ships.
"""

from __future__ import annotations

import importlib
import os

from confedge.proxy import build_kind

COMPILED = (
    "confedge.proxy.server",
    "confedge.proxy.exchange",
    "confedge.proxy.upstream",
    "confedge.proxy.core",
    "confedge.proxy.redirect",
    "confedge.proxy.paths",
    "confedge.proxy.accesslog",
    # The TURN control plane's Allocate path (issue 14)
    "confedge.stun.message",
    "confedge.stun.integrity",
    "confedge.stun.mac",
    "confedge.turn.auth",
    "confedge.turn.core",
    "confedge.turn.portdraw",
)


def test_the_build_under_test_is_the_one_expected() -> None:
    expected = os.environ.get("CONFEDGE_EXPECT_BUILD", "interpreted")
    kinds = {
        name: importlib.import_module(name).__file__.endswith(".so")  # type: ignore[union-attr]
        for name in COMPILED
    }
    if expected == "compiled":
        assert build_kind() == "compiled (mypyc)"
        assert all(kinds.values()), kinds
    else:
        assert build_kind() == "interpreted"
        assert not any(kinds.values()), kinds


def test_native_turn_data_plane_is_there_when_the_run_asks_for_it() -> None:
    """`make test-native` sets CONFEDGE_DATAPLANE=native: the C data plane must then import from
    the build under test (else the TURN suites would not be testing it)."""
    from confedge.turn import native

    ok, why = native.native_available()
    if os.environ.get("CONFEDGE_DATAPLANE") == "native":
        assert ok, why
        if os.environ.get("CONFEDGE_EXPECT_BUILD") == "compiled":
            assert "/build/native/" in (native._native.__file__ or "")
    elif not ok:
        assert "not built" in why or "Linux" in why
