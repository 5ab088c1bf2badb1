"""`confedge demo`: the whole service on loopback, in front of three simulated conferencing nodes.

Why it exists: anyone can see a real WebRTC call cross confedge (proxy for signalling, TURN for
media, guard for PINs) without owning a conferencing platform. It runs the same components as
`confedge run`, on an embedded configuration (src/confedge/data/demo.toml) with unprivileged ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from confedge.config import Config, parse_config, to_builtins, to_toml
from confedge.runtime import Runtime, wait_for_signal
from confedge.turn.service import host_peer_entries

log = logging.getLogger("confedge.demo")

NODE_PORTS = (18001, 18002, 18003)
# `--port-base N`: every port at a fixed offset from N, so that demos (and test suites) run side
# by side. The relays start at N+100 so that the service ports can grow without moving them.
PORT_OFFSETS = {"https": 0, "http": 1, "turn": 2, "turns": 3, "status": 4, "nodes": 5}
RELAY_OFFSET, RELAY_COUNT = 100, 1000
PORT_BASE_MAX = 65535 - RELAY_OFFSET - RELAY_COUNT + 1


@dataclass(frozen=True)
class DemoPorts:
    """Every port one demo uses. `default()` is the documented set (docs/DEMO.md)."""

    https: int
    http: int
    turn: int
    turns: int
    status: int
    nodes: tuple[int, ...]
    relays: tuple[int, int]

    @classmethod
    def default(cls) -> DemoPorts:
        return cls(8443, 8080, 3478, 5349, 9090, NODE_PORTS, (50000, 50999))

    @classmethod
    def from_base(cls, base: int) -> DemoPorts:
        """The ports of `--port-base base` (ValueError naming the allowed range)."""
        if not 1024 <= base <= PORT_BASE_MAX:
            raise ValueError(
                f"{base} is not within 1024-{PORT_BASE_MAX} (the demo uses ports N to "
                f"N+{RELAY_OFFSET + RELAY_COUNT - 1})"
            )
        o = PORT_OFFSETS
        nodes = tuple(base + o["nodes"] + i for i in range(len(NODE_PORTS)))
        relays = (base + RELAY_OFFSET, base + RELAY_OFFSET + RELAY_COUNT - 1)
        return cls(
            base + o["https"],
            base + o["http"],
            base + o["turn"],
            base + o["turns"],
            base + o["status"],
            nodes,
            relays,
        )


@dataclass(frozen=True)
class DemoConference:
    alias: str
    host_pin: str | None
    guest_pin: str | None


CONFERENCES = (
    DemoConference("meet", "1234", None),
    DemoConference("open", None, None),
)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "confedge-demo"


def demo_config(state_dir: Path, turn_password: str, ports: DemoPorts | None = None) -> Config:
    """The embedded demo configuration, with its placeholders filled in (and its ports moved
    when `ports` is not the default set)."""
    text = resources.files("confedge").joinpath("data/demo.toml").read_text(encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(text)
    data["server"]["state_dir"] = str(state_dir)
    data["turn"]["password"] = turn_password
    ports = ports or DemoPorts.default()
    data["proxy"]["nodes"] = [f"http://127.0.0.1:{p}" for p in ports.nodes]
    if ports != DemoPorts.default():
        data["proxy"].update(https_port=ports.https, http_port=ports.http)
        data["turn"].update(
            port=ports.turn, tls_port=ports.turns, relay_ports="{}-{}".format(*ports.relays)
        )
        data["management"]["port"] = ports.status
    # The browser and the simulated nodes run on this host, and Chromium offers the host's
    # interface addresses as candidates: list them, since TURN refuses its own addresses as
    # peers otherwise.  Only local processes may allocate here (media_nodes = 127.0.0.0/8), and
    # they reach those addresses directly anyway.
    data["turn"]["allowed_peers"] = [*data["turn"]["allowed_peers"], *host_peer_entries()]
    return parse_config(data)


class Demo:
    """The demo's parts: the runtime (guard, TURN, proxy) and three simulated nodes.

    Tests use it in-process (e.g. to kill one node and check that a new join still works);
    `confedge demo` wraps it with signal handling and the banner or JSON line.
    """

    def __init__(
        self, state_dir: Path, *, turn_password: str | None = None, port_base: int | None = None
    ) -> None:
        self.ports = DemoPorts.default() if port_base is None else DemoPorts.from_base(port_base)
        self.cfg = demo_config(state_dir, turn_password or secrets.token_urlsafe(12), self.ports)
        self.runtime = Runtime(self.cfg)
        # The effective configuration, so that `confedge bans --config STATE/demo.toml list`
        # (and `confedge check`) work on the running demo. It holds the demo's TURN password.
        state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = state_dir / "demo.toml"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# Written by `confedge demo` at start: its effective configuration.\n")
            f.write(to_toml(to_builtins(self.cfg)))
        self.runtime.config_path = str(self.config_path)  # SIGHUP reads its [tls] again
        self.nodes: list[Any] = []

    async def _start_nodes(self) -> None:
        from confedge.nodesim import Conference, NodeSim, TurnInfo

        turn = None
        if self.runtime.turn is not None:
            t = self.runtime.turn.info()
            turn = TurnInfo(
                host=t["host"], port=t["port"], username=t["username"], password=t["password"]
            )
        for i, port in enumerate(self.ports.nodes, 1):
            node = NodeSim(
                conferences=[Conference(c.alias, c.host_pin, c.guest_pin) for c in CONFERENCES],
                turn=turn,
                node_name=f"node{i}",
            )
            await node.start("127.0.0.1", port)
            self.runtime.add(f"node{i}", node)
            self.nodes.append(node)

    async def start(self) -> None:
        # Nodes start after TURN (they allocate relays on it) and before the proxy (whose first
        # health checks would otherwise mark them down).
        await self.runtime.start(before_proxy=self._start_nodes)

    async def close(self) -> None:
        await self.runtime.close()

    def info(self) -> dict[str, Any]:
        """The one-line JSON of SPEC §8 naming what the demo started."""
        rt = self.runtime
        out: dict[str, Any] = {}
        if rt.proxy is not None:
            out["proxy"] = rt.proxy.info()
        if rt.turn is not None:
            out["turn"] = rt.turn.info()
            if rt.turn.tls_port:
                out["turn"]["tls_port"] = rt.turn.tls_port  # turns: (TURN over TLS)
            if self.cfg.turn.tls_on_https and rt.proxy is not None:
                # TURN over TLS on the HTTPS port (turn.tls_on_https), what a browser uses.
                out["turn"]["turns"] = turns_url(out["turn"]["host"], rt.proxy.https_port)
        out["nodes"] = [node.url for node in self.nodes]
        out["conferences"] = [
            {"alias": c.alias, "pin": c.host_pin, "guest_pin": c.guest_pin} for c in CONFERENCES
        ]
        out["config"] = str(self.config_path)
        if rt.admin is not None:
            out.update(rt.admin.info())  # "status": the management status page
        return out


async def run_demo(*, as_json: bool, state_dir: Path | None, port_base: int | None = None) -> int:
    state = state_dir or default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    demo = Demo(state, port_base=port_base)
    try:
        await demo.start()
    except OSError as exc:
        print(
            f"confedge demo: cannot start: {exc}\n(the demo needs the 127.0.0.1 ports "
            f"{_demo_ports(demo.ports)}; is another demo, coturn or nginx running? "
            "--port-base N moves them all)",
            file=sys.stderr,
        )
        await demo.close()
        return 1
    from confedge.pidfile import remove_pidfile, write_pidfile

    pidfile = write_pidfile(state)  # `confedge cert --config STATE/demo.toml` can reload it
    try:
        info = demo.info()
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            _print_banner(info)
        # As `confedge run`: SIGUSR1/SIGUSR2 drain and cancel (`confedge drain --config
        # STATE/demo.toml` finds the demo by its pid file; without handlers their default
        # action killed the demo while the command reported a drain).
        rt = demo.runtime
        rt.finished = asyncio.get_running_loop().create_future()
        sig = await wait_for_signal(
            on_hup=rt.reload,
            handlers={signal.SIGUSR1: rt.start_drain, signal.SIGUSR2: rt.cancel_drain},
            until=rt.finished,
        )
        log.info("%s received, stopping", sig)
        await demo.close()
    finally:
        remove_pidfile(pidfile)
    return 0


def turns_url(host: str, port: int) -> str:
    """The ICE server URL of TURN over TLS (RFC 7065 §3: turns, TCP) on `host`:`port`."""
    h = f"[{host}]" if ":" in host else host
    return f"turns:{h}:{port}?transport=tcp"


def _demo_ports(ports: DemoPorts) -> str:
    listed = [ports.https, ports.http, ports.turn, ports.turns, ports.status, *ports.nodes]
    return ", ".join(str(p) for p in listed) + " and {}-{}".format(*ports.relays)


def _command() -> str:
    """How this confedge was started, so the banner's commands work as printed (`make demo`
    runs .venv/bin/confedge, which is not on PATH)."""
    argv0 = sys.argv[0]
    if Path(argv0).name == "confedge":
        return argv0
    return f"{Path(sys.executable).name} -m confedge"


def _print_banner(info: dict[str, Any]) -> None:
    lines = ["", "confedge demo is running on loopback. Ctrl-C stops it.", ""]
    if "proxy" in info:
        base = info["proxy"]["https"].rstrip("/")
        lines.append(f"  Open:        {base}/webapp/  (self-signed certificate)")
        if "http" in info["proxy"]:
            lines.append(f"  HTTP:        {info['proxy']['http']}  (redirects to HTTPS)")
    for c in info["conferences"]:
        if c["pin"]:
            guests = f"guest PIN {c['guest_pin']}" if c["guest_pin"] else "guests: leave PIN empty"
            pin = f"host PIN {c['pin']}; {guests}"
        else:
            pin = "no PIN"
        lines.append(f"  Conference:  {c['alias']}  ({pin})")
    if "turn" in info:
        t = info["turn"]
        lines.append(
            f"  TURN:        turn:{t['host']}:{t['port']}  user {t['username']}  "
            f"password {t['password']}  realm {t['realm']}"
        )
        if t.get("tls_port"):
            lines.append(f"  TURNS:       turns:{t['host']}:{t['tls_port']}  (same credential)")
        if "turns" in t:
            lines.append(f"  TURN/TLS:    {t['turns']}  (on the HTTPS port, same credential)")
    for url in info["nodes"]:
        lines.append(f"  Node:        {url}")
    if "status" in info:
        lines.append(f"  Status:      {info['status']}  (also .json, /metrics)")
    lines.append(f"  Bans:        {_command()} bans --config {info['config']} list")
    lines.append("")
    print("\n".join(lines), flush=True)
