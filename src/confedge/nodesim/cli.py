"""``confedge nodesim``: run a simulated conferencing node from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from confedge.logsetup import setup_service_logging

from .core import Conference, TurnInfo
from .node import NodeSim

__all__ = ["build_parser", "nodesim_command"]

DEFAULT_CONFERENCE = "meet:1234"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse exits; keep its status (2) and its one-line message, without the usage dump.
        self.exit(2, f"confedge nodesim: {message}\n")


def _hostport(text: str, what: str) -> tuple[str, int]:
    bad = argparse.ArgumentTypeError(
        f'{what} "{text}" is not host:port (e.g. "127.0.0.1:8080" or "[::1]:8080")'
    )
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise bad
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or ":" in host:
            raise bad
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise bad
    return host, int(port_s)


def _conference(text: str) -> Conference:
    try:
        return Conference.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="confedge nodesim",
        description="Run a simulated Pexip Infinity conferencing node (plain HTTP; put the "
        "confedge proxy in front of it for HTTPS).",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=lambda t: _hostport(t, "--listen"),
        help="address to listen on, host:port (default 127.0.0.1:8080; port 0 = any free port)",
    )
    p.add_argument(
        "--conference",
        action="append",
        type=_conference,
        metavar="ALIAS[:HOSTPIN[:GUESTPIN]]",
        help=f"a conference; repeat for more (default {DEFAULT_CONFERENCE}). With a host PIN "
        'and no guest PIN, guests join with the PIN "none".',
    )
    p.add_argument(
        "--turn",
        type=lambda t: _hostport(t, "--turn"),
        metavar="HOST:PORT",
        help="TURN server the node relays its media through (restricted mode)",
    )
    p.add_argument("--turn-user", default="", help="TURN long-term credential: username")
    p.add_argument("--turn-password", default="", help="TURN long-term credential: password")
    p.add_argument("--name", default="nodesim", help="node name (X-Confedge-Node header)")
    p.add_argument("--maintenance", action="store_true", help="start in maintenance mode")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log lines written to standard error (default: info)",
    )
    return p


async def _run(node: NodeSim, host: str, port: int, maintenance: bool) -> int:
    try:
        await node.start(host, port)
    except OSError as exc:
        print(f"confedge nodesim: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    node.set_maintenance(maintenance)
    print(f"nodesim {node.node_name} listening on {node.url}", flush=True)
    for conf in node.state.conferences.values():
        pins = "no PIN"
        if conf.host_pin:
            guest = conf.guest_pin or 'guests: "none"'
            pins = f"host PIN {conf.host_pin}, guest PIN {guest}"
        print(f"  conference {conf.alias}: {pins}; page {node.url}/webapp/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await node.close()
    return 0


def nodesim_command(argv: list[str]) -> int:
    """Entry point of ``confedge nodesim``; returns the process exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    conferences = args.conference or [Conference.parse(DEFAULT_CONFERENCE)]
    turn: TurnInfo | None = None
    if args.turn is not None:
        if not args.turn_user or not args.turn_password:
            print(
                "confedge nodesim: --turn needs --turn-user and --turn-password "
                "(the TURN server's long-term credential)",
                file=sys.stderr,
            )
            return 2
        turn = TurnInfo(args.turn[0], args.turn[1], args.turn_user, args.turn_password)
    elif args.turn_user or args.turn_password:
        print("confedge nodesim: --turn-user/--turn-password need --turn", file=sys.stderr)
        return 2
    setup_service_logging(args.log_level, "%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        node = NodeSim(conferences, turn, args.name)
    except ValueError as exc:
        print(f"confedge nodesim: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    return asyncio.run(_run(node, host, port, args.maintenance))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(nodesim_command(sys.argv[1:]))
