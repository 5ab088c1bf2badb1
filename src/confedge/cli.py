"""The `confedge` command.

Subcommands: run, demo, check, bans, nodesim. Each keeps its own logic in its package; this module
only parses arguments, loads the configuration and reports errors as one clear line (never a
traceback for an operator mistake).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from confedge import __version__
from confedge.config import Config, ConfigError, load_config, to_toml
from confedge.proxy import build_kind


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    from confedge.tls.certs import check_tls_config

    # The certificate files are checked too (key matches, chain order, names, expiry), so a
    # bad [tls] section is found before `confedge run` at 2 a.m.
    problems, warnings = check_tls_config(cfg, dt.datetime.now(dt.UTC))
    if problems:
        for line in problems:
            print(f"confedge: {line}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(cfg.masked(), indent=2))
    else:
        print(f"# {args.config}: configuration is valid; effective values (secrets masked)")
        print(f"# proxy hot path: {build_kind()}")
        for line in warnings:
            print(f"# warning: {line}")
        print(to_toml(cfg.masked()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    _setup_logging(args.log_level)
    state = Path(cfg.server.state_dir)
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
        try:
            await rt.start()
        except (OSError, ConfigError) as exc:
            # Listener, certificate (CertificateError is an OSError) and store problems are
            # one line each; Runtime.start has already stopped what had started.
            print(f"confedge: cannot start: {exc}", file=sys.stderr)
            return 1
        sig = await wait_for_signal(on_hup=rt.reload)
        logging.getLogger("confedge").info("%s received, stopping", sig)
        await rt.close()
        return 0

    return _run_loop(main())


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from confedge.demo import run_demo

    state = Path(args.state_dir) if args.state_dir else None
    return _run_loop(run_demo(as_json=args.json, state_dir=state))


def cmd_bans(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = _load(args.config)
    _setup_logging(args.log_level)
    from confedge.guard.cli import bans_command

    return bans_command(cfg, rest)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="confedge",
        description="Edge service for video conferencing: HTTPS reverse proxy, TURN/STUN relay "
        "and PIN brute-force guard.",
    )
    p.add_argument("--version", action="version", version=f"confedge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            sp.add_argument(
                "--config", "-c", required=True, metavar="FILE", help="TOML configuration file"
            )
        sp.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )

    sp = sub.add_parser("run", help="start what the configuration file enables")
    common(sp)
    sp = sub.add_parser("check", help="validate a configuration file and print it, secrets masked")
    sp.add_argument("--config", "-c", required=True, metavar="FILE")
    sp.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    sp = sub.add_parser("demo", help="the whole service on loopback with simulated nodes")
    common(sp, config=False)
    sp.add_argument("--json", action="store_true", help="print one JSON line naming what started")
    sp.add_argument("--state-dir", metavar="DIR", help="where the demo keeps its certificate")
    sp = sub.add_parser(
        "bans", help="list, add, remove or clear guard bans (list|add|remove|clear)"
    )
    common(sp)
    sub.add_parser("nodesim", help="run a simulated conferencing node", add_help=False)
    sp = sub.add_parser("firewall", help="print, load or check the host firewall (docs/DEPLOY.md)")
    sp.add_argument("--config", "-c", default="/etc/confedge/confedge.toml", metavar="FILE")
    sp.add_argument("--format", choices=["nft", "iptables", "ip6tables"], default="nft")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true", help="load it now (nft -f, atomically)")
    how.add_argument("--check", action="store_true", help="diff the loaded table; exit 1 if stale")
    sp = sub.add_parser("install-service", help="install the systemd unit, user and directories")
    sp.add_argument("--config", "-c", default="/etc/confedge/confedge.toml", metavar="FILE")
    sp.add_argument("--user", default="confedge", help="system user to run as (created if absent)")
    sp.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR")
    sp.add_argument("--dry-run", action="store_true", help="print the unit and the steps only")
    from confedge.setup.command import register as register_setup

    register_setup(sub)  # setup, import-reference
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "nodesim":
        return cmd_nodesim(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bans":
        return cmd_bans(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo}
    handlers |= {"firewall": cmd_firewall, "install-service": cmd_install_service}
    if args.command in ("setup", "import-reference"):
        from confedge.setup.command import import_reference_command, setup_command

        handlers |= {"setup": setup_command, "import-reference": import_reference_command}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
