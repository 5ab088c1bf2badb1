"""The `confedge` command.

Subcommands: run, demo, check, bans, cert, nodesim. Each keeps its own logic in its package; this
module only parses arguments, loads the configuration and reports errors as one clear line (never a
traceback for an operator mistake).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from confedge import __version__
from confedge.config import Config, ConfigError, config_warnings, load_config, to_toml
from confedge.logsetup import setup_service_logging
from confedge.opcommand import config_option
from confedge.proxy import build_kind


def _setup_logging(level: str) -> None:
    setup_service_logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s", sys.stderr)


def _run_loop(coro: Any) -> int:
    import uvloop  # a hard dependency: the hot paths are written for it

    try:
        result: int = uvloop.run(coro)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed (during start-up): what had
        # started was stopped by Runtime.start's cleanup; exit like a shell would.
        print("confedge: interrupted during start-up", file=sys.stderr)
        return 130
    return result


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"confedge: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    # The certificate files are checked too (key matches, chain order, names, expiry), so a
    # bad [tls] section is found before `confedge run` at 2 a.m.
    from confedge.opcommand import state_dir_problem
    from confedge.tls.certs import check_tls_config

    problems, warnings = check_tls_config(cfg, dt.datetime.now(dt.UTC))
    state_problem = state_dir_problem(cfg.server.state_dir)
    if state_problem is not None:
        problems.insert(0, state_problem)
    warnings = [*config_warnings(cfg), *warnings]
    if problems:
        for line in problems:
            print(f"confedge: {line}", file=sys.stderr)
        return 2
    from confedge.proxy import engines

    try:  # an engine set to "native" where its extension is not built
        h1, h2 = engines(cfg)
    except ValueError as exc:
        print(f"confedge: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for line in warnings:  # standard output stays JSON
            print(f"confedge: warning: {line}", file=sys.stderr)
        print(json.dumps(cfg.masked(), indent=2))
    else:
        print(f"# {args.config}: configuration is valid; effective values (secrets masked)")
        print(f"# proxy hot path: {build_kind()}")
        print(f"# HTTP/1.1 heads: {h1}")
        if h2 is not None:
            print(f"# HTTP/2 framing: {h2}")
        for line in warnings:
            print(f"# warning: {line}")
        print(to_toml(cfg.masked()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    _setup_logging(args.log_level)
    state = Path(cfg.server.state_dir)
    from confedge.opcommand import state_dir_problem

    problem = state_dir_problem(cfg.server.state_dir)
    if problem is not None:
        print(f"confedge: {problem}", file=sys.stderr)
        return 2
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"confedge: server.state_dir: cannot create {state}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        from confedge.runtime import Runtime, wait_for_signal

        rt = Runtime(cfg)
        rt.config_path = args.config  # SIGHUP reads its [tls] again
        # A SIGHUP during start-up (a reload right after `systemctl start`, or `cert install`
        # racing the start) must not kill the process, as the default action would: it is
        # remembered and done once everything runs.
        early_hup: list[bool] = []
        signal_loop = asyncio.get_running_loop()
        signal_loop.add_signal_handler(signal.SIGHUP, early_hup.append, True)
        # Likewise a stop (`systemctl stop` while it starts, Ctrl-C): remembered, and once
        # the start is over everything is stopped in order (the guard's store flushed), exit 0,
        # where the default action killed the process half-started. A second one is the
        # default action again: a start that hangs can still be interrupted.
        early_stop: list[str] = []

        def stop_when_started(sig: signal.Signals) -> None:
            early_stop.append(sig.name)
            signal_loop.remove_signal_handler(sig)

        for stop_sig in (signal.SIGTERM, signal.SIGINT):
            signal_loop.add_signal_handler(stop_sig, stop_when_started, stop_sig)
        try:
            await rt.start()
        except (OSError, ConfigError) as exc:
            # Listener, certificate (CertificateError is an OSError) and store problems are
            # one line each; Runtime.start has already stopped what had started.
            print(f"confedge: cannot start: {exc}", file=sys.stderr)
            return 1
        from confedge.pidfile import remove_pidfile, write_pidfile

        pidfile = write_pidfile(state)  # `confedge cert install` signals this process
        if early_stop:
            log = logging.getLogger("confedge")
            log.info("%s received while starting, stopping", early_stop[0])
            try:
                await rt.close()
            finally:
                remove_pidfile(pidfile)
            return 0
        if early_hup:
            rt.reload()
        try:
            rt.finished = signal_loop.create_future()
            sig = await wait_for_signal(
                on_hup=rt.reload,
                handlers={signal.SIGUSR1: rt.start_drain, signal.SIGUSR2: rt.cancel_drain},
                until=rt.finished,
            )
            logging.getLogger("confedge").info("%s received, stopping", sig)
            await rt.close()
        finally:
            remove_pidfile(pidfile)
        return 0

    return _run_loop(main())


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from confedge.demo import run_demo

    state = Path(args.state_dir) if args.state_dir else None
    return _run_loop(run_demo(as_json=args.json, state_dir=state, port_base=args.port_base))


def _operator_command(args: argparse.Namespace) -> Config:
    """Config and logging of `bans`/`cert`/`cluster`: one result line on the terminal, audit
    to a file."""
    from confedge.opcommand import resolve_config, setup_command_logging

    cfg = _load(resolve_config(args))
    setup_command_logging(cfg.server.state_dir, getattr(args, "log_level", "warning"))
    return cfg


def cmd_bans(args: argparse.Namespace) -> int:
    cfg = _operator_command(args)
    from confedge.guard.cli import run_bans

    return run_bans(cfg, args)


def cmd_cluster(args: argparse.Namespace) -> int:
    cfg = _operator_command(args)
    from confedge.cluster.cli import run_cluster

    return run_cluster(cfg, args)


def cmd_cert(args: argparse.Namespace) -> int:
    cfg = _operator_command(args)
    from confedge.tls.cli import cert_command

    return cert_command(cfg, args.config, args, sys.stdout)


def cmd_firewall(args: argparse.Namespace) -> int:
    from confedge.host.firewall import firewall_command

    cfg = _load(args.config)
    return firewall_command(cfg, args.config, args.format, args.apply, args.check)


def cmd_install_service(args: argparse.Namespace) -> int:
    from confedge.host.service import install_service_command

    cfg = _load(args.config)
    return install_service_command(
        cfg, args.config, user=args.user, unit_dir=args.unit_dir, dry_run=args.dry_run
    )


def cmd_nodesim(rest: list[str]) -> int:
    from confedge.nodesim.cli import nodesim_command

    return nodesim_command(rest)


def _port_base(text: str) -> int:
    from confedge.demo import DemoPorts

    try:
        base = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    try:
        DemoPorts.from_base(base)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return base


def version_lines() -> list[str]:
    """`confedge --version`: the version, then each part that has a native and a pure-Python
    implementation and which one this installation can run, with the reason when it is the
    slower one (what an operator checks after installing, and puts in a bug report)."""
    from confedge.proxy import h1engine, h2engine
    from confedge.turn import native
    from confedge.turn.offload import BPF_OBJECT

    h1_ok, h1_why = h1engine.native_available()
    h2_ok, h2_why = h2engine.native_available()
    turn_ok, turn_why = native.native_available()
    return [
        f"confedge {__version__} (Python {sys.version.split()[0]})",
        f"proxy hot path: {build_kind()}",
        "HTTP/1.1 heads: "
        + (h1engine.describe("native") if h1_ok else f"httptools alone: {h1_why}"),
        "HTTP/2 framing: "
        + (h2engine.describe("native") if h2_ok else f"hyper-h2 (pure Python): {h2_why}"),
        "TURN data plane: " + ("native (C relay threads)" if turn_ok else f"Python: {turn_why}"),
        "eBPF relay offload: "
        + (
            "built (turn.offload)"
            if BPF_OBJECT.is_file()
            else "not built (no clang when confedge was built: apt install clang libbpf-dev, "
            "then reinstall)"
        ),
    ]


class _VersionAction(argparse.Action):
    """--version, computed when asked for: the native parts are looked up only then, not at
    every command's start."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print("\n".join(version_lines()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="confedge",
        description="Edge service for video conferencing: HTTPS reverse proxy, TURN/STUN relay "
        "and PIN brute-force guard.",
    )
    p.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version and which native parts this installation has, and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            config_option(sp)
        sp.add_argument(
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="least severe log lines written to standard error (default: info)",
        )

    sp = sub.add_parser(
        "run",
        help="start what the configuration file enables",
        description="Start what the configuration file enables. SIGHUP reloads the "
        "configuration, SIGUSR1 drains (SIGUSR2 cancels), SIGTERM or Ctrl-C stops cleanly; "
        "the pid is kept in STATE_DIR/confedge.pid for `confedge cert`, `reload`, `drain`.",
    )
    common(sp)
    sp = sub.add_parser(
        "check",
        help="validate a configuration file and print it, secrets masked",
        description="Validate a configuration file (and its certificate files) and print the "
        "effective values with secrets masked. Exit status 2 on any problem.",
    )
    config_option(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    sp = sub.add_parser(
        "demo",
        help="the whole service on loopback with simulated nodes",
        description="The whole service on loopback in front of three simulated conferencing "
        "nodes (docs/DEMO.md). Ctrl-C stops it.",
    )
    common(sp, config=False)
    sp.add_argument("--json", action="store_true", help="print one JSON line naming what started")
    sp.add_argument("--state-dir", metavar="DIR", help="where the demo keeps its certificate")
    sp.add_argument(
        "--port-base",
        type=_port_base,
        metavar="N",
        help="derive every port from N (HTTPS N, HTTP N+1, TURN N+2, TURNS N+3, status N+4, "
        "nodes N+5..N+7, relays N+100..N+1099) so a demo runs beside another one; "
        "default: the fixed ports of docs/DEMO.md",
    )
    from confedge.guard.cli import DESCRIPTION as BANS_DESCRIPTION
    from confedge.guard.cli import configure_parser as configure_bans
    from confedge.tls.cli import configure_parser as configure_cert

    sp = sub.add_parser(
        "bans",
        help="list, add, remove or clear guard bans (list|add|remove|clear)",
        description=BANS_DESCRIPTION,
    )
    configure_bans(sp)
    sp = sub.add_parser(
        "cert",
        help="show, install or regenerate the TLS certificate (show|install|self-signed)",
        description="The TLS certificates: show what is served, install the operator's own "
        "(checked first; the running service reloads), or generate a self-signed one.",
    )
    configure_cert(sp)
    from confedge.cluster.cli import DESCRIPTION as CLUSTER_DESCRIPTION
    from confedge.cluster.cli import configure_parser as configure_cluster

    sp = sub.add_parser(
        "cluster",
        help="list the instances sharing cluster.store (list)",
        description=CLUSTER_DESCRIPTION,
    )
    configure_cluster(sp)
    sub.add_parser(
        "nodesim",
        help="run a simulated conferencing node (`confedge nodesim --help` for its options)",
        add_help=False,
    )
    sp = sub.add_parser(
        "firewall",
        help="print, load or check the host firewall (docs/DEPLOY.md)",
        description="Print the nftables ruleset the configuration needs (or, with --format, the "
        "iptables-restore form), load it with --apply, or compare the loaded one with --check. "
        "It is one table, inet confedge, replaced in one transaction; no other table is "
        "touched. Its input policy is drop: besides confedge's ports it admits SSH on "
        "firewall.ssh_port (22) from firewall.ssh_networks (anywhere), so check those before "
        "--apply on a host whose SSH listens elsewhere. To remove it: nft delete table inet "
        "confedge.",
    )
    config_option(sp)
    sp.add_argument(
        "--format",
        choices=["nft", "iptables", "ip6tables"],
        default="nft",
        help="nft ruleset (default) or iptables-restore input for hosts without nft",
    )
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true", help="load it now (nft -f, atomically)")
    how.add_argument("--check", action="store_true", help="diff the loaded table; exit 1 if stale")
    sp = sub.add_parser(
        "install-service",
        help="install the systemd unit, user and directories",
        description="Create the system user (--user, never root), server.state_dir and the log "
        "directory owned by it, give the configuration file to its group (mode 0640), and "
        "write the hardened confedge.service for this configuration into --unit-dir. Needs "
        "root; --dry-run prints every step and the unit instead. Then: confedge firewall "
        "--apply, systemctl enable --now confedge (docs/DEPLOY.md).",
    )
    config_option(sp, "TOML configuration file the service runs with")
    sp.add_argument("--user", default="confedge", help="system user to run as (created if absent)")
    sp.add_argument(
        "--unit-dir",
        default="/etc/systemd/system",
        metavar="DIR",
        help="where the unit file is written (default: %(default)s)",
    )
    sp.add_argument("--dry-run", action="store_true", help="print the unit and the steps only")
    from confedge.setup.command import register as register_setup

    register_setup(sub)  # setup, import-reference
    from confedge.opscli import configure_parsers as register_ops

    register_ops(sub)  # drain, reload
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one confedge command; its exit status.

    A reader that stops early (`confedge check | head`, `confedge bans list | sed -n 3p`) closes
    the pipe: the rest of the output has nowhere to go, which is not an error worth a traceback.
    Python's documented recipe (the "signal" module's notes on SIGPIPE): point stdout at
    /dev/null so the interpreter's final flush cannot raise again, and exit 1.
    """
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "nodesim":
        return cmd_nodesim(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bans":
        return cmd_bans(args)
    if args.command == "cert":
        return cmd_cert(args)
    if args.command == "cluster":
        return cmd_cluster(args)
    if args.command in ("drain", "reload"):
        return int(args.handler(args))
    handlers = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo}
    handlers |= {"firewall": cmd_firewall, "install-service": cmd_install_service}
    if args.command in ("setup", "import-reference"):
        from confedge.setup.command import import_reference_command, setup_command

        handlers |= {"setup": setup_command, "import-reference": import_reference_command}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
