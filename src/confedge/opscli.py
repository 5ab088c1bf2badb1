"""`confedge drain` and `confedge reload`: signal the running instance (docs/OPERATIONS.md).

Why signals and not a management API call: the running `confedge run` is found the way `confedge
cert install` finds it (the pid file `server.state_dir/confedge.pid`), and systemd's
`systemctl reload` / `kill -s` reach the same handlers, so one mechanism serves both:

- SIGUSR1: drain (confedge/drain.py); SIGUSR2: cancel the drain, back to service.
- SIGHUP: reload the whole configuration file. The running process writes the outcome to
  `state_dir/confedge.reload` (JSON: time, ok, reason), which `confedge reload` waits for and
  prints, so a refused reload is reported where it was asked for, not only in the log.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from confedge.config import ConfigError, load_config
from confedge.opcommand import config_option
from confedge.pidfile import signal_running

__all__ = [
    "DRAIN_RESULT",
    "RELOAD_RESULT",
    "cmd_drain",
    "cmd_reload",
    "configure_parsers",
    "write_drain_result",
    "write_reload_result",
]

RELOAD_RESULT = "confedge.reload"
DRAIN_RESULT = "confedge.drain"  # what the last drain signal did (cmd_drain reads it)
# How long `confedge reload` waits for the running process's answer.
RELOAD_WAIT = 10.0


def write_reload_result(state_dir: str, ok: bool, reason: str) -> None:
    """The outcome of a reload, for `confedge reload` to print (best effort)."""
    _write_result(state_dir, RELOAD_RESULT, {"ok": ok, "reason": reason})


def write_drain_result(state_dir: str, done: bool, phase: str, reason: str = "") -> None:
    """What a drain or its cancel did (`done`: it changed the phase), for `confedge drain` to
    print: the signal is one-way, and "drain cancelled" printed for an instance that was not
    draining told the operator something that had not happened."""
    _write_result(state_dir, DRAIN_RESULT, {"ok": done, "phase": phase, "reason": reason})


def _write_result(state_dir: str, name: str, answer: dict[str, object]) -> None:
    path = Path(state_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    try:
        tmp.write_text(json.dumps({"time": time.time(), **answer}) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


def signal_and_wait(
    state_dir: str, sig: signal.Signals, name: str
) -> tuple[int | None, dict[str, Any] | None]:
    """Signal the running instance and wait for its answer in STATE_DIR/`name` (written after
    the signal was handled, at most RELOAD_WAIT seconds): (pid, answer); (None, None) when
    nothing runs, (pid, None) when it did not answer in time. PermissionError (another user's
    process) goes to the caller. Also used by `confedge cert install`, which reloads."""
    result = Path(state_dir) / name
    try:
        before = result.stat().st_mtime_ns
    except OSError:
        before = 0
    pid = signal_running(state_dir, sig)
    if pid is None:
        return None, None
    end = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < end:
        try:
            if result.stat().st_mtime_ns != before:
                answer = json.loads(result.read_text(encoding="utf-8"))
                if isinstance(answer, dict):
                    return pid, answer
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return pid, None


def _signal_and_wait(state_dir: str, sig: signal.Signals, name: str) -> tuple[int, Any] | None:
    """signal_and_wait for `confedge drain|reload`: None when nothing runs or it did not
    answer, each said in one line."""
    try:
        pid, answer = signal_and_wait(state_dir, sig, name)
    except PermissionError:
        print(
            f"confedge: the running confedge could not be signalled (permission denied): run "
            f"this as its user or root, or `kill -s {sig.name[3:]} PID`",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    if pid is None:
        print(
            f"confedge: no confedge is running with server.state_dir = {state_dir} "
            "(no live pid in confedge.pid)",
            file=sys.stderr,
        )
        return None
    if answer is None:
        print(f"confedge: pid {pid} did not answer within {RELOAD_WAIT:g} s; see its log")
        return None
    return pid, answer


def _config(path: str) -> tuple[str, float, float]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"confedge: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg.server.state_dir, cfg.proxy.drain_grace, cfg.proxy.drain_timeout


def cmd_drain(args: argparse.Namespace) -> int:
    state_dir, grace, timeout = _config(args.config)
    sig = signal.SIGUSR2 if args.cancel else signal.SIGUSR1
    got = _signal_and_wait(state_dir, sig, DRAIN_RESULT)
    if got is None:
        return 1
    pid, answer = got
    if not answer.get("ok"):
        # Nothing changed: cancelling an instance that serves, or draining one that drains.
        print(f"pid {pid}: {answer.get('reason') or 'nothing changed'}")
        return 0
    if args.cancel:
        print(f"drain cancelled (pid {pid}): listeners open, health endpoint serving")
    else:
        print(
            f"draining (pid {pid}): health endpoint answers 503 for {grace:g} s, then the "
            f"listeners close; it exits when the last connection and allocation end, at the "
            f"latest after {timeout:g} s. `confedge drain --cancel` returns it to service."
        )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    state_dir, _, _ = _config(args.config)  # a file that does not validate is not sent
    got = _signal_and_wait(state_dir, signal.SIGHUP, RELOAD_RESULT)
    if got is None:
        return 1
    pid, answer = got
    if answer.get("ok"):
        print(f"reloaded the running confedge (pid {pid})")
        return 0
    reason = str(answer.get("reason"))
    if reason.startswith("applied only in part"):
        print(f"confedge: reload {reason}")
    else:
        print(f"confedge: reload refused, the running configuration stays: {reason}")
    return 1


def configure_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `drain` and `reload` (cli.py calls this)."""
    sp = sub.add_parser(
        "drain",
        help="take the running instance out of service without cutting calls (--cancel)",
        description="Drain the running confedge (SIGUSR1): its health endpoint says draining "
        "for proxy.drain_grace seconds, then the listeners close, calls in flight and TURN "
        "allocations go on, and it exits when they end or at proxy.drain_timeout. --cancel "
        "(SIGUSR2) returns it to service.",
    )
    config_option(sp)
    sp.add_argument("--cancel", action="store_true", help="return to service")
    sp.set_defaults(handler=cmd_drain)
    sp = sub.add_parser(
        "reload",
        help="reload the running instance's configuration (SIGHUP) and say whether it took",
        description="Validate the file, SIGHUP the running confedge and print its answer: "
        "reloaded, or refused with the reason (the running configuration then stays).",
    )
    config_option(sp)
    sp.set_defaults(handler=cmd_reload)
