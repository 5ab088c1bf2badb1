"""`confedge firewall`: print, load (`--apply`) or compare (`--check`) the host firewall.

Why `--check` loads the wanted table into a throwaway network namespace: nft prints a loaded
ruleset in its own canonical form (sets reordered, `0x0001` as `0x1`, ports merged), so the
text we generate can never be compared with `nft list` directly. `unshare --net` gives an empty
namespace in which the generated table loads without touching the host's traffic; listing it
there yields the same canonical form, and the diff against the live table is then exact.
Counters, the guard's ban elements and the rate limiters' dynamic entries are state, not
configuration, and are left out of the comparison.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping

from confedge.config import Config
from confedge.host.banset import nft_binary, read_banned
from confedge.host.ruleset import BAN_SETS, TABLE, iptables_ruleset, nft_ruleset, nft_table

__all__ = ["apply", "check", "firewall_command", "normalise", "ssh_lockout"]

_STATEFUL_SETS = {*BAN_SETS.values(), "conn_rate_v4", "conn_rate_v6", "stun_rate_v4"}
_STATEFUL_SETS |= {"stun_rate_v6"}
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


class FirewallError(Exception):
    """nft could not be run or refused the ruleset; the message is for the operator."""


def _nft(args: list[str], script: str | None = None, nft: str | None = None) -> str:
    try:
        proc = subprocess.run(
            [nft or nft_binary(), *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as exc:
        raise FirewallError(
            f"cannot run nft: {exc.strerror or exc} (apt install nftables)"
        ) from None
    if proc.returncode != 0:
        raise FirewallError(proc.stderr.strip() or f"nft exited with status {proc.returncode}")
    return proc.stdout


def loaded_table(nft: str | None = None) -> str | None:
    """`nft list table inet confedge` now, or None when it is not loaded."""
    try:
        return _nft(["list", "table", "inet", TABLE], nft=nft)
    except FirewallError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise


def ssh_lockout(cfg: Config, env: Mapping[str, str] = os.environ) -> str | None:
    """Why the table would drop a new SSH login like the one this command runs in, or None.

    The table's policy is drop and it admits SSH only on firewall.ssh_port from
    firewall.ssh_networks; the operator's own session survives an --apply (established flows
    pass), so the mistake shows only at the next login. SSH_CONNECTION ("client port server
    port") says where this session came from and to which port."""
    parts = env.get("SSH_CONNECTION", "").split()
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    client, port, fw = parts[0], int(parts[3]), cfg.firewall
    if fw.ssh_port == 0:
        why = "firewall.ssh_port = 0 closes SSH"
    elif fw.ssh_port != port:
        why = (
            f"it opens SSH on firewall.ssh_port = {fw.ssh_port}, but this session came in on {port}"
        )
    else:
        try:
            ip = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return None
        nets = [ipaddress.ip_network(n, strict=False) for n in fw.ssh_networks]
        if any(ip.version == n.version and ip in n for n in nets):
            return None
        why = f"firewall.ssh_networks does not include {client}, where this session comes from"
    return (
        f"{why}: this session stays open, but a new SSH login like it will be dropped; set "
        "[firewall] ssh_port / ssh_networks and apply again"
    )


def apply(cfg: Config, source: str = "", nft: str | None = None) -> int:
    """Replace the table in one `nft -f` transaction, keeping the guard's current bans."""
    banned: dict[int, list[str]] = {}
    if loaded_table(nft) is not None:
        banned = read_banned(_nft(["-j", "list", "table", "inet", TABLE], nft=nft))
    script = nft_ruleset(cfg, source=source, banned=banned)
    _nft(["-f", "-"], script, nft)
    kept = sum(len(v) for v in banned.values())
    print(f"confedge: table inet {TABLE} loaded ({kept} banned address(es) kept)")
    lockout = ssh_lockout(cfg)
    if lockout:
        print(f"confedge: warning: {lockout}", file=sys.stderr)
    return 0


def normalise(listing: str) -> list[str]:
    """A listing without its state: counter values, ban and rate-limit set elements."""
    out: list[str] = []
    current = ""
    skipping = False
    for line in listing.splitlines():
        stripped = line.strip()
        m = re.match(r"set (\S+) \{", stripped)
        if m:
            current = m.group(1)
        elif stripped == "}":
            current = ""
        if skipping:
            skipping = not stripped.endswith("}")
            continue
        if current in _STATEFUL_SETS and stripped.startswith("elements = {"):
            skipping = not stripped.endswith("}")
            continue
        out.append(_COUNTER.sub("counter", line.rstrip()))
    return out


def wanted_listing(cfg: Config, nft: str | None = None) -> str:
    """The table for `cfg` as nft would list it once loaded (see the module docstring)."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(nft_table(cfg))
        f.flush()
        cmd = [
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            'set -e; "$0" -f "$1"; "$0" list table inet confedge',
            nft or nft_binary(),
            f.name,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except OSError as exc:
            raise FirewallError(f"cannot run unshare: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            raise FirewallError(
                "cannot load the wanted ruleset into a scratch network namespace "
                f"(needs root): {proc.stderr.strip()}"
            )
        return proc.stdout


def check(cfg: Config, nft: str | None = None) -> int:
    """0 when the loaded table is what `cfg` needs; 1 with a unified diff when not."""
    wanted = normalise(wanted_listing(cfg, nft))
    live_text = loaded_table(nft)
    if live_text is None:
        print(f"confedge: table inet {TABLE} is not loaded; run `confedge firewall --apply`")
        return 1
    live = normalise(live_text)
    if live == wanted:
        print(f"confedge: table inet {TABLE} matches the configuration")
        return 0
    sys.stdout.writelines(
        line + "\n"
        for line in difflib.unified_diff(live, wanted, "loaded", "configuration", lineterm="")
    )
    print(f"confedge: table inet {TABLE} differs; `confedge firewall --apply` loads the above")
    return 1


def firewall_command(cfg: Config, path: str, fmt: str, do_apply: bool, do_check: bool) -> int:
    """The subcommand; `path` names the configuration file in the generated header."""
    try:
        if do_apply and fmt == "nft":
            return apply(cfg, path)
        if do_check and fmt == "nft":
            return check(cfg)
    except FirewallError as exc:
        print(f"confedge: firewall: {exc}", file=sys.stderr)
        return 2
    if (do_apply or do_check) and fmt != "nft":
        print(
            "confedge: --apply and --check work with nftables only; load the iptables form with "
            "iptables-restore and ip6tables-restore",
            file=sys.stderr,
        )
        return 2
    if fmt == "nft":
        sys.stdout.write(nft_ruleset(cfg, source=path))
        if cfg.guard.firewall and not cfg.guard.enabled:
            print(
                "# note: guard.firewall is set but guard.enabled is false: nothing fills the sets"
            )
        lockout = ssh_lockout(cfg)
        if lockout:
            print(f"# warning: {lockout}")
        return 0
    sys.stdout.write(iptables_ruleset(cfg, source=path)[6 if fmt == "ip6tables" else 4])
    if cfg.guard.firewall:
        print("# note: guard.firewall needs the nftables form (the ban sets are nft sets)")
    return 0
