"""The core's shape: no asyncio, one transition table that refuses what it does not list."""

import subprocess
import sys

import pytest

from confedge.proxy.exchange import TRANSITIONS, ExchangeError, State

from .helpers import request, start


def test_core_imports_no_asyncio() -> None:
    code = "import sys, confedge.proxy.exchange; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_core_imports_no_adapter() -> None:
    adapters = [
        "server",
        "h2",
        "upstream",
        "core",
        "redirect",
        "service",
        "healthcheck",
        "guardcalls",
        "turnshare",
    ]
    code = (
        "import sys, confedge.proxy.exchange; "
        f"print([m for m in {adapters!r} if 'confedge.proxy.' + m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, confedge.proxy.exchange; print(list(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "httptools" not in loaded
    assert "'h2'" not in loaded  # hyper-h2, the HTTP/2 adapter's framing library


def test_every_state_has_a_row_and_done_is_final() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.DONE] == frozenset()


def test_illegal_transition_raises() -> None:
    ex = start(request())
    with pytest.raises(ExchangeError):
        ex._go(State.TUNNEL)
