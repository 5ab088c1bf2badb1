"""`confedge install-service`: the systemd unit, the system user and the directories it needs.

Why generated from the configuration rather than shipped fixed: three lines depend on it.
`LimitNOFILE` must cover the relay range (one socket per relay port) and the proxy's
connection cap (a client and a node socket each); CAP_NET_ADMIN is only handed to the process
when `guard.firewall` needs nft; `ReadWritePaths=` names `server.state_dir` and the log
directory, the only places `ProtectSystem=strict` leaves writable.

`plan_install()` is pure: it returns the unit text and the steps (create the user, the
directories with owners and modes, write the unit, reload systemd). `--dry-run` prints the
steps; otherwise `run_steps()` performs them and says what it did.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from confedge.config import Config
from confedge.opcommand import state_dir_problem

__all__ = ["Step", "nofile_limit", "plan_install", "render_unit", "run_steps"]

UNIT_NAME = "confedge.service"
NOFILE_HEADROOM = 1024


def nofile_limit(cfg: Config) -> tuple[int, str]:
    """(LimitNOFILE, the sum spelled out for the unit's comment)."""
    lo, hi = cfg.turn.relay_port_range
    relays = (hi - lo + 1) if cfg.turn.enabled else 0
    conns = cfg.proxy.max_connections if cfg.proxy.enabled else 0
    total = 2 * relays + 2 * conns + NOFILE_HEADROOM
    why = f"2 x {relays} relay ports + 2 x {conns} proxy connections + {NOFILE_HEADROOM}"
    return total, why


def confedge_binary() -> str:
    """The `confedge` script of this installation (the venv's, when run from one)."""
    beside = Path(sys.executable).with_name("confedge")
    if beside.exists():
        return str(beside)
    return shutil.which("confedge") or str(beside)


def log_dir(cfg: Config) -> str:
    """Where file logs go: the access log's directory when it is a file, else /var/log/confedge."""
    if cfg.proxy.access_log:
        return str(Path(cfg.proxy.access_log).parent)
    return "/var/log/confedge"


def _quote(path: str, *, exec_line: bool = False) -> str:
    """`path` as one word of a unit setting: quoted like a shell word when it has blanks or
    quotes (systemd unquotes ExecStart= and ReadWritePaths= that way), "%" doubled (systemd
    expands "%n", "%h", ... in both), and on ExecStart= "$" doubled (environment expansion)."""
    word = shlex.quote(path) if any(c in path for c in " \t\"'\\") else path
    word = word.replace("%", "%%")
    return word.replace("$", "$$") if exec_line else word


# A user name useradd accepts (Debian's default NAME_REGEX, with the system-user "$" suffix).
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")
# Where the unit's sandbox hides files from the service: PrivateTmp= and ProtectHome=.
_HIDDEN = (
    ("/tmp", "PrivateTmp=yes gives the service an empty /tmp of its own"),
    ("/var/tmp", "PrivateTmp=yes gives the service an empty /var/tmp of its own"),
    ("/home", "ProtectHome=yes hides /home from the service"),
    ("/root", "ProtectHome=yes hides /root from the service"),
    ("/run/user", "ProtectHome=yes hides /run/user from the service"),
)


def check_install(cfg: Config, config_path: str, user: str) -> tuple[list[str], list[str]]:
    """(problems, warnings) of installing `cfg` as a service run by `user`.

    Problems stop the installation (nothing is done): a user that is root (the unit's
    sandbox assumes an unprivileged user) or not a valid name, a relative state_dir or log path
    (the service runs from "/", and systemd ignores a relative ReadWritePaths=). Warnings are
    files the sandbox will hide from the service, so it would fail at start."""
    problems: list[str] = []
    if user == "root" or _uid(user) == 0:
        problems.append(
            f"--user {user}: the service must not run as root (the unit gives an unprivileged "
            'user the two capabilities it needs); use the default "confedge" or another '
            "system user"
        )
    elif not _USER_NAME.fullmatch(user):
        problems.append(
            f'--user "{user}": not a valid user name (lower-case letters, digits, "-" and "_", '
            'e.g. "confedge")'
        )
    for key, path in (
        ("server.state_dir", cfg.server.state_dir),
        ("proxy.access_log", cfg.proxy.access_log),
    ):
        if path and not os.path.isabs(path):
            problems.append(
                f'{key}: "{path}" is a relative path; the service runs from "/" and systemd '
                "ignores relative ReadWritePaths=; give an absolute path (e.g. "
                '"/var/lib/confedge")'
            )
    state_problem = state_dir_problem(cfg.server.state_dir)
    if state_problem is not None:
        problems.append(state_problem)
    warnings: list[str] = []
    named = [
        ("the configuration file", config_path),
        ("server.state_dir", cfg.server.state_dir),
        ("the log directory", log_dir(cfg)),
        ("tls.cert", cfg.tls.cert),
        ("tls.key", cfg.tls.key),
    ]
    for what, path in named:
        for top, why in _HIDDEN:
            if path and (path == top or path.startswith(top + "/")):
                warnings.append(
                    f"{what} {path} is under {top}: {why}, so it will not find it there; move it "
                    "(e.g. to /etc/confedge or /var/lib/confedge)"
                )
    return problems, warnings


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def user_group(user: str) -> str:
    """The primary group of an existing user; a user useradd will create gets its own group."""
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return user


def render_unit(cfg: Config, config_path: str, *, user: str, exec_path: str) -> str:
    """The unit file for `cfg` (see the module docstring and data/confedge.service.in)."""
    template = resources.files("confedge").joinpath("data/confedge.service.in").read_text()
    nofile, why = nofile_limit(cfg)
    ambient = "CAP_NET_BIND_SERVICE"
    if cfg.guard.enabled and cfg.guard.firewall:
        ambient += " CAP_NET_ADMIN"
    rw = " ".join(_quote(p) for p in dict.fromkeys([cfg.server.state_dir, log_dir(cfg)]))
    return Template(template).substitute(
        config=_quote(config_path, exec_line=True),
        exec=_quote(exec_path, exec_line=True),
        user=user,
        group=user_group(user),
        nofile=nofile,
        nofile_why=why,
        ambient=ambient,
        rw_paths=rw,
    )


@dataclass(frozen=True)
class Step:
    """One thing the installer does; `describe` is what --dry-run prints."""

    kind: str  # "useradd", "mkdir", "chmod", "write", "systemctl"
    path: str = ""
    mode: int = 0
    content: str = ""
    argv: tuple[str, ...] = ()

    def describe(self, user: str) -> str:
        if self.kind in ("useradd", "systemctl"):
            return "run: " + shlex.join(self.argv)
        if self.kind == "mkdir":
            group = user_group(user)
            return f"mkdir -p {self.path}; chown {user}:{group}; chmod {self.mode:o}"
        if self.kind == "chmod":
            group = user_group(user)
            return f"chgrp {group} {self.path}; chmod {self.mode:o} (it holds secrets)"
        return f"write {self.path} (mode {self.mode:o})"


def plan_install(
    cfg: Config, config_path: str, *, user: str, unit_dir: str, exec_path: str
) -> list[Step]:
    """Every step of an installation, in order; nothing is done here."""
    steps: list[Step] = []
    try:
        pwd.getpwnam(user)
    except KeyError:
        steps.append(
            Step(
                "useradd",
                argv=(
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    cfg.server.state_dir,
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "confedge edge service",
                    user,
                ),
            )
        )
    steps.append(Step("mkdir", path=cfg.server.state_dir, mode=0o750))
    steps.append(Step("mkdir", path=log_dir(cfg), mode=0o750))
    steps.append(Step("chmod", path=config_path, mode=0o640))
    unit = render_unit(cfg, config_path, user=user, exec_path=exec_path)
    steps.append(Step("write", path=str(Path(unit_dir) / UNIT_NAME), mode=0o644, content=unit))
    if Path("/run/systemd/system").is_dir():  # systemd is PID 1 here
        steps.append(Step("systemctl", argv=("systemctl", "daemon-reload")))
    return steps


def run_steps(steps: list[Step], user: str) -> None:
    """Perform the steps; raise OSError (or CalledProcessError) naming the one that failed."""
    for step in steps:
        if step.kind in ("useradd", "systemctl"):
            subprocess.run(step.argv, check=True, capture_output=True, text=True)
        elif step.kind == "mkdir":
            path = Path(step.path)
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, user, user_group(user))
            path.chmod(step.mode)
        elif step.kind == "chmod":
            path = Path(step.path)
            shutil.chown(path, group=user_group(user))
            path.chmod(step.mode)
        elif step.kind == "write":
            path = Path(step.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(step.content)
            tmp.chmod(step.mode)
            os.replace(tmp, path)
        print(f"confedge: {step.describe(user)}")


def install_service_command(
    cfg: Config, config_path: str, *, user: str, unit_dir: str, dry_run: bool
) -> int:
    """The subcommand: print (--dry-run) or perform the installation; one line per step."""
    config_abs = str(Path(config_path).resolve())
    problems, warnings = check_install(cfg, config_abs, user)
    for line in problems:
        print(f"confedge: {line}", file=sys.stderr)
    if problems:
        return 2
    for line in warnings:
        print(f"confedge: warning: {line}", file=sys.stderr)
    steps = plan_install(cfg, config_abs, user=user, unit_dir=unit_dir, exec_path=confedge_binary())
    if dry_run:
        for step in steps:
            print(f"# {step.describe(user)}")
            if step.kind == "write":
                print(step.content, end="")
        return 0
    if os.geteuid() != 0:
        print(
            "confedge: install-service needs root (it creates a system user and writes "
            f"{unit_dir}); try --dry-run to see what it would do",
            file=sys.stderr,
        )
        return 2
    try:
        run_steps(steps, user)
    except subprocess.CalledProcessError as exc:
        print(f"confedge: {shlex.join(exc.cmd)} failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    except (OSError, KeyError, LookupError) as exc:
        print(f"confedge: install-service: {exc}", file=sys.stderr)
        return 1
    print(
        f"confedge: installed; next: `confedge firewall --config {config_abs} --apply`, then "
        "`systemctl enable --now confedge`"
    )
    return 0
