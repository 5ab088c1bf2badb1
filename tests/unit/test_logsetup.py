"""Service logging (confedge/logsetup.py): the same lines as logging.Formatter, cheaper."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from confedge.logsetup import SecondCachedFormatter

FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _record(created: float, msg: str = "allocation ended: user=%s") -> logging.LogRecord:
    r = logging.LogRecord("confedge.turn", logging.INFO, "core.py", 1, msg, ("bench",), None)
    r.created = created
    r.msecs = (created - int(created)) * 1000
    return r


def test_lines_are_those_of_the_standard_formatter_across_seconds() -> None:
    ours, std = SecondCachedFormatter(FMT), logging.Formatter(FMT)
    t0 = time.time()
    # within one second, across a second boundary, back to an earlier second, a later day
    for created in (t0, t0 + 0.001, t0 + 0.999, t0 + 1.5, t0 - 3.25, t0 + 86_400.0123):
        rec = _record(created)
        assert ours.format(rec) == std.format(rec)
    # an explicit datefmt is honoured as logging does
    ours_d, std_d = SecondCachedFormatter("%(asctime)s"), logging.Formatter("%(asctime)s")
    rec = _record(t0)
    assert ours_d.formatTime(rec, "%H:%M") == std_d.formatTime(rec, "%H:%M")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout + out.stderr


def test_setup_turns_off_what_the_format_does_not_show() -> None:
    out = _run(
        "import logging, sys\n"
        "from confedge.logsetup import setup_service_logging\n"
        "setup_service_logging('warning', '%(levelname)s %(name)s: %(message)s', sys.stdout)\n"
        "logging.getLogger('x').info('hidden')\n"
        "logging.getLogger('x').warning('shown %d', 7)\n"
        "r = logging.getLogger('x').makeRecord('x', 30, 'f', 1, 'm', (), None)\n"
        "print(logging._srcfile, logging.logThreads, logging.logProcesses, r.thread, r.process)\n"
    )
    assert out.splitlines() == ["WARNING x: shown 7", "None False False None None"]


def test_a_format_that_shows_the_process_keeps_it() -> None:
    out = _run(
        "import logging, os, sys\n"
        "from confedge.logsetup import setup_service_logging\n"
        "setup_service_logging(logging.INFO, '%(name)s[%(process)d] %(message)s', sys.stdout)\n"
        "logging.getLogger('w').info('up')\n"
        "print(os.getpid())\n"
    )
    line, pid = out.splitlines()
    assert line == f"w[{pid}] up"


def test_an_already_configured_root_is_left_alone() -> None:
    out = _run(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, format='first %(message)s', stream=sys.stdout)\n"
        "from confedge.logsetup import setup_service_logging\n"
        "setup_service_logging('error', 'second %(message)s', sys.stdout)\n"
        "logging.getLogger('y').debug('kept')\n"
        "print(logging._srcfile is not None, logging.logThreads)\n"
    )
    assert out.splitlines() == ["first kept", "True True"]
