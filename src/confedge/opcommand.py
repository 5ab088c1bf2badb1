"""What the operator's one-shot commands (`confedge bans`, `confedge cert`) share: where their
log lines go, and a `--config` option accepted before or after the action.

Why not the service's set-up (INFO to standard error): an operator who types `confedge bans add
192.0.2.7` wants one plain answer ("banned 192.0.2.7 for 5m00s"), not the audit record of the
change printed a second time with a timestamp and a logger name. The audit record still matters
(who banned whom, which certificate was installed when), so it goes where records are kept: the
file `server.state_dir/audit.log`, appended, mode 0600. The terminal shows warnings and errors
only (or more with `--log-level debug`/`info`, for troubleshooting).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from confedge.config import default_config_path

__all__ = [
    "AUDIT_LOGGERS",
    "AUDIT_NAME",
    "add_action",
    "add_common_options",
    "resolve_config",
    "setup_command_logging",
    "state_dir_problem",
]

AUDIT_NAME = "audit.log"
# The loggers whose records are the audit trail of operator commands.
AUDIT_LOGGERS = ("confedge.guard.audit", "confedge.tls.audit")
_FORMAT = "%(asctime)s %(name)s: %(message)s"


def state_dir_problem(state_dir: str) -> str | None:
    """Why server.state_dir cannot be a directory (it, or a directory above it, is an existing
    file), as one line naming the key; None when it is or can be created. mkdir alone would
    say "File exists" or "Not a directory", which names neither the key nor the fix."""
    path = Path(state_dir)
    for p in (*reversed(path.parents), path):
        if p.exists() and not p.is_dir():
            what = f'"{state_dir}"' if p == path else f'"{state_dir}": {p}'
            return (
                f"server.state_dir: {what} is a file, not a directory; set state_dir to a "
                'directory (e.g. "/var/lib/confedge") or move the file away'
            )
    return None


def _audit_handler(state_dir: str) -> logging.Handler | None:
    path = Path(state_dir) / AUDIT_NAME
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        print(
            f"confedge: warning: cannot write the audit log {path}: {exc.strerror or exc}; "
            "audit lines go to standard error",
            file=sys.stderr,
        )
        return None
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def setup_command_logging(state_dir: str, level: str = "warning") -> None:
    """Terminal: `level` and above (at least WARNING unless asked for more); audit loggers:
    appended to `state_dir/audit.log` (standard error if it cannot be written)."""
    wanted = getattr(logging, level.upper(), logging.WARNING)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal.setLevel(min(wanted, logging.WARNING))
    root = logging.getLogger()
    root.addHandler(terminal)
    root.setLevel(min(wanted, logging.INFO))
    audit = _audit_handler(state_dir)
    for name in AUDIT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if audit is not None:
            logger.addHandler(audit)
        else:
            fallback = logging.StreamHandler(sys.stderr)
            fallback.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(fallback)
            logger.propagate = False


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--config and --log-level, on the command and on each of its actions, so that both
    `confedge bans --config F list` and `confedge bans list --config F` work (SUPPRESS keeps an
    action's parser from overwriting a value given before the action)."""
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML configuration file, the one `confedge run` uses (default: "
        f"{default_config_path()}; CONFEDGE_CONFIG changes it)",
    )
    p.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="what else to print on the terminal besides the result (default: warning); "
        "audit lines always go to STATE_DIR/audit.log",
    )


def resolve_config(args: argparse.Namespace) -> str:
    """The --config value (given before or after the action), else the default file; stored
    back in ``args.config``, which add_common_options leaves unset when neither gave it, so
    that what reads ``args.config`` later (``cert install`` rewrites the file) sees the same
    path."""
    path = getattr(args, "config", None)
    args.config = str(path) if path else default_config_path()
    return str(args.config)


def config_option(p: argparse.ArgumentParser, what: str = "TOML configuration file") -> None:
    """--config/-c of a command that reads the configuration: every command has the same
    default, the file `confedge setup` writes (config.default_config_path)."""
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=default_config_path(),
        help=f"{what} (default: %(default)s; CONFEDGE_CONFIG changes it)",
    )


def add_action(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, text: str
) -> argparse.ArgumentParser:
    """One action of an operator command: `summary` in the command's list, `text` atop the
    action's own --help, and the common options."""
    p = sub.add_parser(name, help=summary, description=text)
    add_common_options(p)
    return p
