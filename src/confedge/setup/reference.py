"""`confedge import-reference DIR`: the configuration a reference appliance's files amount to.

The reference ("Pexip Reverse Proxy and TURN Server") is an install wizard writing five things,
and DIR is a copy of them (the appliance's tree, e.g. `tar` of the paths below, or the files
side by side; each is looked for by its path, then by its name anywhere under DIR):

* the wizard's saved answers, `~/.reverseproxy-config.json`: host name, domain, interfaces and
  their addresses, `conferencenodes`, `enablecsp`, `turnserver` (`enabled`, `clientturn` =
  permissive, `port443`, `username`; the wizard drops the password and shared secret from it),
  `medianodes`, `managementnetworks`, `enablefail2ban`;
* the nginx site, `/etc/nginx/sites-available/pexapp`: the `upstream` node list (`ip_hash`),
  listen ports, and the CSP `map` (whose policy text is carried over, so pages get the same
  header);
* coturn's `/etc/turnserver.conf` (`listening-ip`, `relay-ip`, `external-ip`, `realm`,
  `listening-port`, `min-port`/`max-port`, `allowed-peer-ip`/`denied-peer-ip`,
  `use-auth-secret`/`static-auth-secret`, `user=`, `userdb`) and its user database
  `/etc/turnuserdb.conf` (SQLite: the shared secrets; passwords only as HMAC keys);
* fail2ban's `/etc/fail2ban/jail.local`, jail `[pexiprp]` over `[DEFAULT]`;
* the certificate, `/etc/nginx/ssl/pexip.pem` (key + certificate + chain in one file), copied
  to `<state_dir>/tls/reference.pem` (mode 0600) and named by `tls.cert`.

The live files win over the saved answers where both speak (they are what ran). Whatever has no
confedge equivalent, or cannot be read back (a password kept only as a hash), is listed, one line
each with the reason; OS settings (DNS, NTP, netmasks, routes, SNMP, SSH) are the host's.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import ipaddress
import json
import math
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from confedge.config import ConfigError

from .document import ConfigDocument
from .values import AnswerError, parse_bool

__all__ = ["Imported", "import_reference", "read_reference"]

ANSWERS = ("home/pexip/.reverseproxy-config.json", "root/.reverseproxy-config.json")
NGINX = ("etc/nginx/sites-available/pexapp", "etc/nginx/sites-enabled/pexapp")
TURNSERVER = ("etc/turnserver.conf",)
TURNUSERDB = ("etc/turnuserdb.conf",)
JAIL = ("etc/fail2ban/jail.local",)
PEM = ("etc/nginx/ssl/pexip.pem",)


@dataclass
class Imported:
    """What the reference's files amount to: values (with where each came from) and losses."""

    values: dict[str, tuple[Any, str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "what: why"
    notes: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)
    pem: Path | None = None

    def put(self, key: str, value: Any, source: str) -> None:
        self.values[key] = (value, source)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")


def _find(root: Path, paths: tuple[str, ...]) -> Path | None:
    for p in paths:
        if (root / p).is_file():
            return root / p
    name = Path(paths[0]).name
    found = sorted(p for p in root.rglob(name) if p.is_file())
    return found[0] if found else None


def _rel(root: Path, p: Path) -> str:
    return str(p.relative_to(root))


def _flag(value: Any, what: str, out: Imported) -> bool | None:
    """A saved yes/no: JSON true/false (or 0/1, "yes"/"no"); anything else is listed and
    skipped, never read as Python truth (the text "false" is not yes)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and parse_bool(value) is not None:
        return parse_bool(value)
    out.skip(what, f"{json.dumps(value)} is not true or false")
    return None


def _texts(value: Any, what: str, out: Imported) -> list[str] | None:
    """A saved list of addresses: a JSON list of strings; anything else is listed and skipped."""
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return [str(v) for v in value]
    out.skip(what, f"{json.dumps(value)[:80]} is not a list of addresses")
    return None


# --- the wizard's saved answers


def _answers(root: Path, out: Imported) -> None:
    path = _find(root, ANSWERS)
    if path is None:
        return
    src = _rel(root, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        out.skip(src, f"not readable as JSON ({exc})")
        return
    if not isinstance(data, dict):
        out.skip(src, "not the wizard's saved answers (expected a JSON object)")
        return
    out.read.append(src)
    for key, name in (("server.hostname", "hostname"), ("server.domain", "domain")):
        if isinstance(data.get(name), str):
            out.put(key, data[name], f"{src}: {name}")
    nets = data.get("networks") or {}
    if not isinstance(nets, dict):
        out.skip(f"{src}: networks", f"{json.dumps(nets)[:80]} is not an object of interfaces")
        nets = {}
    sides = (("internal", "server.internal_address"), ("external", "server.external_address"))
    for side, key in sides:
        nic = data.get(side)
        if not isinstance(nic, str) or nic not in nets:
            continue
        if side == "external" and nic == data.get("internal"):
            continue
        address = nets[nic].get("ipaddress") if isinstance(nets[nic], dict) else None
        if isinstance(address, str) and address:
            out.put(key, address, f"{src}: {side} NIC")
        else:
            out.skip(f"{src}: networks.{nic}", f"no ipaddress for the {side} interface")
    if "enablewebloadbalance" in data:
        flag = _flag(data["enablewebloadbalance"], f"{src}: enablewebloadbalance", out)
        if flag is not None:
            out.put("proxy.enabled", flag, f"{src}: web proxy")
    if data.get("conferencenodes"):
        nodes = _texts(data["conferencenodes"], f"{src}: conferencenodes", out)
        if nodes is not None:
            out.put("proxy.nodes", nodes, f"{src}")
    if "enablecsp" in data:
        flag = _flag(data["enablecsp"], f"{src}: enablecsp", out)
        if flag is not None:
            out.put("proxy.csp", flag, f"{src}: enablecsp")
    turn = data.get("turnserver") or {}
    if not isinstance(turn, dict):
        out.skip(f"{src}: turnserver", f"{json.dumps(turn)[:80]} is not an object")
        turn = {}
    if "enabled" in turn:
        flag = _flag(turn["enabled"], f"{src}: turnserver.enabled", out)
        if flag is not None:
            out.put("turn.enabled", flag, f"{src}: turnserver.enabled")
    if "clientturn" in turn:
        flag = _flag(turn["clientturn"], f"{src}: turnserver.clientturn", out)
        if flag is not None:
            mode = "permissive" if flag else "restricted"
            out.put("turn.mode", mode, f"{src}: turnserver.clientturn")
    if turn.get("port443") and _flag(turn["port443"], f"{src}: turnserver.port443", out):
        # The reference's "TURN on 443" is plain TURN (UDP and TCP) on port 443 instead of
        # 3478, offered when it runs no web proxy; turnserver.conf's listening-port says the same.
        out.put("turn.port", 443, f"{src}: turnserver.port443")
    if turn.get("username"):
        out.put("turn.username", str(turn["username"]), f"{src}: turnserver.username")
    if data.get("medianodes"):
        media = _texts(data["medianodes"], f"{src}: medianodes", out)
        if media is not None:
            out.put("turn.media_nodes", media, f"{src}: medianodes")
    if "managementnetworks" in data:
        nets_ = _texts(data["managementnetworks"] or [], f"{src}: managementnetworks", out)
        if nets_ is not None:
            out.put("management.networks", nets_, f"{src}: managementnetworks (SSH there)")
    if "enablefail2ban" in data:
        flag = _flag(data["enablefail2ban"], f"{src}: enablefail2ban", out)
        if flag is not None:
            out.put("guard.enabled", flag, f"{src}: enablefail2ban")
    for name, why in (
        ("dns", "DNS servers are the host's setting"),
        ("ntp", "NTP is the host's setting"),
        ("snmp", "confedge has no SNMP agent; scrape /metrics on the management port"),
    ):
        if data.get(name):
            out.skip(f"{src}: {name}", why)
    if nets:
        out.skip(
            f"{src}: networks (netmask, gateway, routes)",
            "confedge leaves the host's networking to the host",
        )


# --- nginx site


_UPSTREAM = re.compile(r"upstream\s+\S+\s*\{(.*?)\}", re.S)


def _nginx(root: Path, out: Imported) -> None:
    path = _find(root, NGINX)
    if path is None:
        return
    src = _rel(root, path)
    text = path.read_text(encoding="utf-8", errors="replace")
    out.read.append(src)
    m = _UPSTREAM.search(text)
    if m:
        block = m.group(1)
        nodes = []
        for server in re.findall(r"^\s*server\s+([^\s;]+)", block, re.M):
            host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
            nodes.append(host if port in ("", "443") else f"{host}:{port}")
        if nodes:
            out.put("proxy.nodes", nodes, f"{src}: upstream")
        balance = "round-robin"
        if re.search(r"^\s*ip_hash\s*;", block, re.M):
            balance = "ip-hash"
        elif re.search(r"^\s*least_conn\s*;", block, re.M):
            balance = "least-conn"
        out.put("proxy.balance", balance, f"{src}: upstream")
    https = {int(p) for p in re.findall(r"listen\s+\S*?:?(\d+)\s+ssl", text)}
    plain = {int(p) for p in re.findall(r"listen\s+\S*?:?(\d+)\s*;", text)}
    if https:
        out.put("proxy.https_port", min(https), f"{src}: listen ... ssl")
    if plain:
        out.put("proxy.http_port", min(plain), f"{src}: listen (redirect)")
    csp = re.search(
        r"map\s+\$upstream_http_content_security_policy\s+\$csp\s*\{(.*?)\}", text, re.S
    )
    uses_csp = re.search(r"^\s*add_header\s+Content-Security-Policy", text, re.M) is not None
    out.put("proxy.csp", uses_csp, f"{src}: add_header Content-Security-Policy")
    if csp and uses_csp:
        policy = re.search(r"''\s+\"(.*)\";", csp.group(1))
        if policy:
            out.put("proxy.csp_policy", policy.group(1), f"{src}: the CSP map's policy")
    if re.search(r"^\s*location\s+/(?!api|static|\s|404|50x)\S", text, re.M):
        out.skip(
            f"{src}: extra location blocks",
            "confedge forwards every path to the nodes; serve custom content with [[proxy.static]]",
        )


# --- coturn


def _conf_lines(text: str) -> list[tuple[str, str]]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, value = line.partition("=")
        out.append((name.strip().lstrip("-"), value.strip().strip('"')))
    return out


def _ip_range(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """coturn's peer ranges: "a.b.c.d", "a.b.c.d-e.f.g.h", or (extension) a CIDR."""
    if "-" in text:
        lo, hi = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
        if lo.version != hi.version:
            raise ValueError(f"{lo} and {hi} are not of the same IP version")
        return list(ipaddress.summarize_address_range(lo, hi))
    return [ipaddress.ip_network(text, strict=False)]


def _subtract(
    denied: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`denied` minus `allowed`: coturn lets allowed-peer-ip win, confedge lets denied_peers
    win, so the same behaviour is the denied ranges with the allowed ones cut out of them."""
    result = list(denied)
    for a in allowed:
        nxt: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for d in result:
            if d.version != a.version or not d.overlaps(a):
                nxt.append(d)
            elif a.supernet_of(d):  # type: ignore[arg-type]
                continue
            else:
                nxt.extend(d.address_exclude(a))  # type: ignore[arg-type]
        result = nxt
    return sorted(result, key=lambda n: (n.version, n.network_address))


def _turnserver(root: Path, out: Imported) -> None:
    path = _find(root, TURNSERVER)
    if path is None:
        return
    src = _rel(root, path)
    out.read.append(src)
    allowed: list[Any] = []
    denied: list[Any] = []
    secrets: list[str] = []
    secret_sources: list[str] = []
    users: list[tuple[str, str]] = []
    min_port, max_port = 49152, 65535
    flags: set[str] = set()
    quiet = {"lt-cred-mech", "verbose", "no-stdout-log", "syslog", "fingerprint", "log-file"}
    builtin = {
        "no-loopback-peers": "confedge refuses loopback peers unless turn.allowed_peers lists them",
        "no-multicast-peers": "confedge always refuses multicast peers",
        "no-tcp-relay": "confedge relays UDP only",
        "stale-nonce": "confedge's nonces expire too (turn.nonce_lifetime, 600 s)",
        "no-dtls": "confedge has no DTLS listener",
    }
    for name, value in _conf_lines(path.read_text(encoding="utf-8", errors="replace")):
        where = f"{src}: {name}"
        try:
            if name == "listening-ip":
                out.put("server.internal_address", value, where)
            elif name == "relay-ip":
                out.put("server.external_address", value, where)
            elif name == "external-ip":
                public = value.split("/")[0]
                out.put("server.external_address", public, where + " (the address clients see)")
                out.notes.append(
                    f"{where}={value}: confedge binds and advertises server.external_address; "
                    "on a 1:1 NAT give it the public address and let the NAT forward the relay "
                    "ports"
                )
            elif name == "realm":
                out.put("server.domain", value, where + " (the realm is the domain)")
            elif name == "listening-port":
                out.put("turn.port", int(value), where)
            elif name == "tls-listening-port":
                out.put("turn.tls_port", int(value), where)
            elif name == "min-port":
                min_port = int(value)
            elif name == "max-port":
                max_port = int(value)
            elif name == "allowed-peer-ip":
                allowed += _ip_range(value)
            elif name == "denied-peer-ip":
                denied += _ip_range(value)
            elif name == "static-auth-secret":
                secrets.append(value)
                secret_sources.append(where)
            elif name == "use-auth-secret":
                flags.add(name)
            elif name == "user":
                user, _, password = value.partition(":")
                users.append((user, password))
            elif name == "no-tls":
                out.put("turn.tls_port", 0, where + " (no TURN over TLS)")
            elif name == "userdb":
                before = len(secrets)
                _userdb(root, value, out, users, secrets)
                if len(secrets) > before:
                    secret_sources.append(f"{value}: turn_secret")
            elif name in builtin:
                out.notes.append(f"{where}: {builtin[name]}")
            elif name in quiet or name.startswith(("proc-", "#")):
                continue
            else:
                out.skip(where, "no confedge equivalent")
        except ValueError as exc:
            out.skip(f"{where}={value}", f"not understood ({exc})")
    out.put("turn.relay_ports", f"{min_port}-{max_port}", f"{src}: min-port/max-port")
    if secrets or "use-auth-secret" in flags:
        out.put("turn.mode", "permissive", f"{src}: use-auth-secret")
        if secrets:
            out.put("turn.secrets", secrets, ", ".join(secret_sources))
    if users:
        user, password = users[0]
        out.put("turn.username", user, f"{src}: user=")
        if password.startswith("0x"):
            out.skip(
                f"{src}: user={user}",
                "the password is kept only as an HMAC key; give it with "
                "--set turn.password=... (the one configured on the conferencing platform)",
            )
        elif password:
            out.put("turn.password", password, f"{src}: user=")
        for extra, _ in users[1:]:
            out.skip(f"{src}: user={extra}", "confedge has one long-term credential")
    if allowed:
        out.put("turn.allowed_peers", [str(n) for n in allowed], f"{src}: allowed-peer-ip")
    if denied:
        rest = _subtract(denied, allowed)
        out.put("turn.denied_peers", [str(n) for n in rest], f"{src}: denied-peer-ip")
        if allowed:
            out.notes.append(
                f"{src}: denied-peer-ip minus allowed-peer-ip became turn.denied_peers "
                f"({len(rest)} networks): coturn lets allowed win, confedge lets denied win"
            )


def _userdb(
    root: Path, value: str, out: Imported, users: list[tuple[str, str]], secrets: list[str]
) -> None:
    path = _find(root, (value.lstrip("/"), *TURNUSERDB))
    if path is None:
        out.skip(f"userdb={value}", "not found in the copy; copy that file too")
        return
    src = _rel(root, path)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            secrets += [r[0] for r in db.execute("SELECT value FROM turn_secret")]
            names = [r[0] for r in db.execute("SELECT name FROM turnusers_lt")]
    except sqlite3.Error as exc:
        out.skip(src, f"not readable as coturn's SQLite user database ({exc})")
        return
    out.read.append(src)
    for name in names:
        users.append((name, "0x"))  # coturn keeps only MD5(user:realm:password)


# --- fail2ban


# fail2ban's time words (fail2ban/server/mytime.py, str2seconds): each abbreviation it accepts,
# so "1mo" is a month and "1y" a year, never read as minutes or bare seconds.
_UNITS = (
    (r"years?|yea?|yy?", 365.2425 * 86400),
    (r"months?|mon?", 365.2425 * 86400 / 12),
    (r"weeks?|wee?|ww?", 7 * 86400),
    (r"days?|da|dd?", 86400),
    (r"hours?|ho|hh?", 3600),
    (r"minutes?|mi(?:n(?:ute)?)?|mm?", 60),
    (r"seconds?|se(?:c(?:ond)?)?|ss?|", 1),
)
_PART = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([a-z]*)", re.I)


def _seconds(text: str) -> float:
    """A fail2ban duration: "600", "10m", "1h 30m", "2days", "1mo"; ValueError otherwise."""
    total, pos, parts = 0.0, 0, 0
    while pos < len(text.rstrip()):
        m = _PART.match(text, pos)
        if not m:
            raise ValueError(f"{text!r} is not a duration")
        mult = next((f for u, f in _UNITS if re.fullmatch(u, m.group(2), re.I)), None)
        if mult is None:
            raise ValueError(f"{text!r} is not a duration (unknown unit {m.group(2)!r})")
        total += float(m.group(1)) * mult
        pos, parts = m.end(), parts + 1
    if not parts:
        raise ValueError(f"{text!r} is not a duration")
    return round(total, 3)


def _jail(root: Path, out: Imported) -> None:
    path = _find(root, JAIL)
    if path is None:
        return
    src = _rel(root, path)
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, inline_comment_prefixes=(";", "#")
    )
    try:
        parser.read_string(path.read_text(encoding="utf-8", errors="replace"))
    except configparser.Error as exc:
        out.skip(src, f"not readable as a fail2ban jail ({exc})")
        return
    out.read.append(src)
    if not parser.has_section("pexiprp"):
        out.skip(src, "has no [pexiprp] jail (the PIN jail); guard thresholds left at defaults")
        return
    jail = parser["pexiprp"]
    where = f"{src}: [pexiprp]"
    if "enabled" in jail and "guard.enabled" not in out.values:
        enabled = parse_bool(jail["enabled"])
        if enabled is None:
            out.skip(f"{where} enabled = {jail['enabled']}", "not true or false")
        else:
            out.put("guard.enabled", enabled, f"{where} enabled")
    if "maxretry" in jail:
        text = jail["maxretry"].strip()
        if not text.isdigit() or int(text) < 1:
            out.skip(f"{where} maxretry = {text}", "not a whole number above 0")
        else:
            ref = int(text)
            ours = max(1, math.ceil(ref / 2))
            out.put("guard.maxretry", ours, f"{where} maxretry = {ref}")
            out.notes.append(
                f"{where} maxretry = {ref} counts the 'PIN required' prompt too (two 403s per "
                f"wrong PIN), so confedge, which counts wrong PINs only, bans after {ours} "
                "(docs/GUARD.md)"
            )
    for name in ("findtime", "bantime"):
        if name in jail:
            try:
                secs = _seconds(jail[name])
            except ValueError as exc:
                out.skip(f"{where} {name} = {jail[name]}", f"not understood ({exc})")
                continue
            if secs <= 0:
                out.skip(
                    f"{where} {name} = {jail[name]}",
                    "a permanent ban has no equivalent; use guard.max_bantime",
                )
                continue
            out.put(f"guard.{name}", int(secs) if secs.is_integer() else secs, f"{where} {name}")
    if "ignoreip" in jail:
        nets = []
        for item in jail["ignoreip"].replace(",", " ").split():
            try:
                nets.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                out.skip(
                    f"{where} ignoreip {item}",
                    "not an address or network (host names are not resolved)",
                )
        out.put("guard.ignore", nets, f"{where} ignoreip")


def read_reference(root: Path) -> Imported:
    out = Imported()
    for reader in (_answers, _nginx, _turnserver, _jail):
        try:
            reader(root, out)
        except OSError as exc:  # an unreadable copy: say which, carry over the rest
            out.skip(str(exc.filename or root), f"cannot read it ({exc.strerror or exc})")
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            # A shape no reader expected (a hand-edited or damaged copy): that file's remaining
            # settings are listed as not carried over, the other files still are.
            what = reader.__name__.lstrip("_")
            out.skip(f"{root} ({what})", f"not understood ({type(exc).__name__}: {exc})")
    pem = _find(root, PEM)
    if pem is not None:
        out.pem = pem
        out.read.append(_rel(root, pem))
    external = out.values.get("server.external_address")
    if external and external[0] == out.values.get("server.internal_address", (None,))[0]:
        del out.values["server.external_address"]  # relay-ip = listening-ip: one interface
    if out.values.get("turn.mode", ("",))[0] == "permissive":
        out.values.pop("turn.media_nodes", None)  # the safelist is restricted mode's
    return out


_ORDER = ("server", "proxy", "turn", "guard", "tls", "management")


def build_document(imported: Imported, root: Path) -> ConfigDocument:
    """A new configuration file, each key with a comment naming the reference file it came
    from, so the operator can see where every value came from."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"confedge configuration imported from a reference appliance ({root})"))
    doc.add(
        tomlkit.comment(
            "by `confedge import-reference` (docs/SETUP.md). Keys: docs/CONFIGURATION.md"
        )
    )
    for section in _ORDER:
        keys = [(k, v) for k, v in imported.values.items() if k.split(".")[0] == section]
        if not keys:
            continue
        table = tomlkit.table()
        for key, (value, source) in keys:
            name = key.split(".")[1]
            item = tomlkit.item(value)
            item.comment(source)
            table.add(name, item)
        doc.add(tomlkit.nl())
        doc.add(section, table)
    return ConfigDocument(tomlkit.dumps(doc))


def import_reference(args: argparse.Namespace) -> int:
    from .command import _err, _finish, apply_settings, parse_settings
    from .questions import State

    root = Path(args.dir)
    if not root.is_dir():
        _err(f"{root}: not a directory (give the directory holding the appliance's files)")
        return 2
    imported = read_reference(root)
    if not imported.read:
        for line in imported.skipped:
            print(f"not carried over: {line}")
        found = "found, but none usable (above)" if imported.skipped else "found"
        _err(
            f"{root}: none of the reference's files {found} (.reverseproxy-config.json, "
            "sites-available/pexapp, turnserver.conf, jail.local, pexip.pem)"
        )
        return 2
    path = Path(args.config)
    doc = build_document(imported, root)
    try:
        existing = ConfigDocument.load(path) if path.exists() else None
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        _err(f"{path}: fix or move that file first; nothing written")
        return 2
    doc.path, doc.original = path, existing.original if existing else ""
    try:
        state = State({k: v for k, (v, _) in imported.values.items()}, interactive=False)
        apply_settings(doc, state, parse_settings(args.settings))
    except (AnswerError, ConfigError) as exc:
        for line in exc.problems if isinstance(exc, ConfigError) else [str(exc)]:
            _err(line)
        return 2
    print(f"Read from {root}: " + ", ".join(imported.read))
    pem_dest = _place_certificate(imported, doc, existing)
    for line in imported.notes:
        print(f"note: {line}")
    for line in imported.skipped:
        print(f"not carried over: {line}")
    if imported.pem is not None and pem_dest is not None and not args.dry_run and _valid(doc):
        pem_dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(imported.pem, pem_dest)
        pem_dest.chmod(0o600)
    return _finish(doc, path, args.dry_run)


def _place_certificate(
    imported: Imported, doc: ConfigDocument, existing: ConfigDocument | None
) -> Path | None:
    """Where the reference's PEM goes, or None when it must not be copied.

    Setup never replaces an installed certificate unless asked (SPEC §5): a configuration that
    already names one keeps it, and a different file already at the destination is not
    overwritten; either way the reason is listed, with the command that does it on purpose."""
    if imported.pem is None:
        return None
    if doc.get("tls.cert"):  # --set tls.cert=...: the operator chose
        return None
    installed = existing.get("tls.cert") if existing else None
    if installed and existing:
        doc.set("tls.cert", installed)
        doc.set("tls.key", existing.get("tls.key"))
        imported.skip(
            str(imported.pem),
            f"{existing.path} already names a certificate ({installed}), "
            "which is kept; install the reference's with `confedge cert install`",
        )
        return None
    state_dir = doc.get("server.state_dir") or "/var/lib/confedge"
    dest = Path(state_dir) / "tls" / "reference.pem"
    if dest.exists() and dest.read_bytes() != imported.pem.read_bytes():
        imported.skip(
            str(imported.pem),
            f"{dest} exists and holds another certificate, which is not overwritten; remove "
            "it first or install with `confedge cert install`",
        )
        doc.set("tls.cert", str(dest))
        return None
    doc.set("tls.cert", str(dest))
    print(
        f"Certificate: {imported.pem} (key + certificate + chain) is copied to {dest} "
        "(mode 0600) and named by tls.cert"
    )
    return dest


def _valid(doc: ConfigDocument) -> bool:
    try:
        doc.validate()
    except ConfigError:
        return False
    return True
