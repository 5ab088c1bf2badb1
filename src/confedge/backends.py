"""Choosing between a native (C) implementation and its pure-Python twin.

Two parts of confedge have both: TURN's data plane (`turn.dataplane`, turn/native.py) and the
HTTP/2 engine (`proxy.http2_engine`, proxy/h2engine.py). Each takes "auto", "native" or
"python", lets an environment variable override the key (the test suites run once per
implementation with it), falls back quietly from "auto" and refuses "native" when the
extension is not there, naming whichever of the two set it. One rule for both, so that an
operator reads the same message from each."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["choose"]

CHOICES = ("auto", "native", "python")


def choose(
    setting: str,
    *,
    env: str,
    key: str,
    available: Callable[[], tuple[bool, str]],
    fell_back: Callable[[str], None] | None = None,
) -> str:
    """The implementation, "native" or "python", for the config value `setting` (config key
    `key`), or the environment variable `env` when set; `available()` says whether the native
    one is built and why not, and `fell_back(why)` hears of an "auto" that had to take Python.
    Raises ValueError naming the key (or the variable) when "native" is asked for and not
    available, or the value is none of CHOICES."""
    value = os.environ.get(env) or setting
    if value not in CHOICES:
        raise ValueError(f'{env}={value!r}: expected "auto", "native" or "python"')
    if value == "python":
        return "python"
    ok, why = available()
    if ok:
        return "native"
    if value == "native":
        raise ValueError(f'{env if os.environ.get(env) else key} = "native": {why}')
    if fell_back is not None:
        fell_back(why)
    return "python"
