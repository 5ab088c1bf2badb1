"""`confedge setup` and `confedge import-reference`: from answers to a written, checked file.

Both end the same way: the whole file through the configuration model (a bad combination is one
line per problem, exit 2, nothing written), an atomic write keeping `.bak`, then exactly what
`confedge check` runs (the model and the certificate checks), then the next steps. A bad answer
anywhere stops everything before the file is touched, so the old file stays byte for byte.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

from confedge.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    config_warnings,
    load_config,
)
from confedge.opcommand import config_option

from .document import ConfigDocument, atomic_write
from .host import host_addresses, host_names
from .questions import QUESTIONS, State, by_key, host_defaults, initial_state
from .values import AnswerError, check_key, convert
from .wizard import Cancelled, apply_answers, ask_all, prompter, summary, wrap

__all__ = ["DEFAULT_CONFIG", "apply_settings", "register", "setup_command"]

NEW_FILE_HEADER = (
    "# confedge configuration, written by `confedge setup` (docs/SETUP.md); every key is\n"
    "# described in docs/CONFIGURATION.md. Re-run `confedge setup` to change the answers:\n"
    "# it keeps your comments and the keys it does not ask about.\n"
)


def _err(line: str) -> None:
    print(f"confedge: {line}", file=sys.stderr)


def add_setup_arguments(sp: argparse.ArgumentParser) -> None:
    """--answers, --set and --dry-run (shared by setup and import-reference)."""
    sp.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one configuration key (dotted, e.g. proxy.balance=ip-hash; lists "
        "comma-separated; repeatable); skips the questions",
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resulting configuration (secrets masked) and write nothing",
    )


def register(sub: Any) -> None:
    """Register `confedge setup` and `confedge import-reference` with the CLI's subparsers."""
    sp = sub.add_parser(
        "setup",
        help="write the configuration: interactive wizard, or --answers/--set",
        description="Asks the questions of the reference appliance's install wizard (defaults "
        "from the current file), shows a summary, writes the file atomically (mode 0600, "
        "the old one kept as .bak) and checks it. With --answers or --set nothing is asked. "
        "See docs/SETUP.md.",
    )
    config_option(sp, "configuration file to create or change")
    sp.add_argument(
        "--answers",
        metavar="FILE",
        help="answers file (TOML, or JSON if it ends in .json) keyed by configuration key",
    )
    add_setup_arguments(sp)
    sp = sub.add_parser(
        "import-reference",
        help="write a configuration from a reference appliance's files",
        description="Reads a copy of a Pexip Reverse Proxy and TURN Server appliance's files "
        "(wizard answers, nginx site, turnserver.conf, fail2ban jail, PEM) and writes the "
        "equivalent configuration, listing what it could not carry over. See docs/SETUP.md.",
    )
    sp.add_argument("dir", metavar="DIR", help="directory holding the appliance's files")
    config_option(sp, "configuration file to write")
    add_setup_arguments(sp)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += _flatten(v, key)
        else:
            out.append((key, v))
    return out


def read_answers(path: str) -> list[tuple[str, Any]]:
    """An answers file: TOML, or JSON when it ends in .json; keys are the configuration's
    dotted names, as nested tables/objects or as "section.key" strings."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the answers file: {exc.strerror}"]) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if p.suffix == ".json" else "TOML"
        raise ConfigError([f"{p}: not valid {kind}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: expected an object of answers keyed by configuration key"])
    return _flatten(data)


def parse_settings(settings: list[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for s in settings:
        key, sep, value = s.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                [f'--set "{s}": expected KEY=VALUE (e.g. --set proxy.balance=ip-hash)']
            )
        out.append((key.strip(), value))
    return out


def apply_settings(doc: ConfigDocument, state: State, answers: list[tuple[str, Any]]) -> None:
    """Validate each answer with its question's validator (or, for keys the wizard does not
    ask, its type and the model's rule) and set it in the document; raise AnswerError."""
    order = {q.key: i for i, q in enumerate(QUESTIONS)}
    for key, raw in sorted(answers, key=lambda kv: order.get(kv[0], len(order))):
        q = by_key(key)
        if key == "interfaces" or q is None:
            value = check_key(key, convert(key, raw))
        else:
            value = q.validate(raw, state)
        state.values[key] = value
        doc.set(key, value)


def _validate(doc: ConfigDocument) -> Config | None:
    try:
        return doc.validate()
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return None


def _tls_words(cfg: Config, path: Path) -> tuple[str, list[str]]:
    """The certificate step in words, and the shell lines to run for it (printed as they are,
    never folded, so that they paste into a shell)."""
    if cfg.tls.cert:
        return (
            f"kept as installed ({cfg.tls.cert}); setup never replaces a certificate: "
            "`confedge cert install` installs another, `confedge cert self-signed` regenerates"
        ), []
    made = (
        f"none installed: a self-signed one for {cfg.server.fqdn} is made in "
        f"{cfg.server.state_dir} at first start"
    )
    webroot = cfg.proxy.acme_webroot
    if webroot and cfg.proxy.enabled:
        # The operator's exact next commands (docs/CERTIFICATES.md, "Let's Encrypt"), quoted
        # for the shell whatever the paths hold.
        hook = (
            f"confedge cert install --config {shlex.quote(str(path))} "
            '--cert "$RENEWED_LINEAGE/fullchain.pem" --key "$RENEWED_LINEAGE/privkey.pem"'
        )
        return (
            f"{made}; once {cfg.server.fqdn} points here and port {cfg.proxy.http_port} is "
            "open, get one from Let's Encrypt (its renewals install themselves):"
        ), [
            f"mkdir -p {shlex.quote(webroot)}",
            f"certbot certonly --webroot --webroot-path {shlex.quote(webroot)} "
            f"--domain {cfg.server.fqdn} \\",
            f"  --deploy-hook {shlex.quote(hook)}",
        ]
    return (
        f"{made}; install yours with `confedge cert install`, or have certbot get one from "
        "Let's Encrypt through the HTTP port (proxy.acme_webroot; docs/CERTIFICATES.md, "
        '"Let\'s Encrypt")'
    ), []


def check_written(path: Path) -> int:
    """What `confedge check` runs: the model, then the certificate files."""
    from confedge.opcommand import state_dir_problem
    from confedge.tls.certs import check_tls_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return 2
    problems, warnings = check_tls_config(cfg, dt.datetime.now(dt.UTC))
    state_problem = state_dir_problem(cfg.server.state_dir)
    if state_problem is not None:
        problems.insert(0, state_problem)
    warnings = [*config_warnings(cfg), *warnings]
    for line in problems:
        _err(line)
    for line in warnings:
        print(f"warning: {line}")
    if problems:
        return 2
    print(f"{path}: configuration is valid (confedge check)")
    return 0


def next_steps(cfg: Config, path: Path) -> list[str]:
    """What is left after the file: certificate, firewall openings, service."""
    words, commands = _tls_words(cfg, path)
    end = "" if commands else "."
    lines = ["", "Next steps:", wrap(f"1. Certificate: {words}{end}", "  ", "     ")]
    lines += [f"       {c}" for c in commands]
    opens: list[str] = []
    if cfg.proxy.enabled:
        opens.append(f"TCP {cfg.proxy.https_port} (HTTPS) from anywhere")
        if cfg.proxy.http_port:
            what = (
                "redirect to HTTPS, ACME challenges"
                if cfg.proxy.acme_webroot
                else "redirect to HTTPS"
            )
            opens.append(f"TCP {cfg.proxy.http_port} ({what}) from anywhere")
    if cfg.turn.enabled:
        if cfg.turn.mode == "permissive":
            who = "anyone"
        elif cfg.turn.media_nodes:
            who = "the media nodes (" + ", ".join(cfg.turn.media_nodes) + "), STUN from anyone"
        else:
            who = "anyone for STUN only: no media node is configured (set turn.media_nodes)"
        opens.append(f"UDP+TCP {cfg.turn.port} (TURN) from {who}")
        opens.append(f"UDP {cfg.turn.relay_ports} (relay) on the external address")
        if cfg.turn.tls_port:
            opens.append(f"TCP {cfg.turn.tls_port} (TURN over TLS)")
    if cfg.management.enabled:
        nets = ", ".join(cfg.management.networks) or "nobody"
        opens.append(f"TCP {cfg.management.port} (status, metrics) from {nets}")
    # The commands that do each step, not only what the step is: the operator's next line.
    lines.append(
        wrap(
            "2. Firewall: open " + "; ".join(opens) + f": `confedge firewall --config {path}` "
            "shows the nftables ruleset, `--apply` loads it (docs/DEPLOY.md).",
            "  ",
            "     ",
        )
    )
    lines.append(
        wrap(
            f"3. Service: `confedge install-service --config {path}`, then `systemctl enable "
            f"--now confedge` (or in the foreground: `confedge run --config {path}`); re-run "
            f"`confedge setup --config {path}` to change an answer.",
            "  ",
            "     ",
        )
    )
    return lines


def _finish(doc: ConfigDocument, path: Path, dry_run: bool, state: State | None = None) -> int:
    cfg = _validate(doc)
    if cfg is None:
        return 2
    if state is not None and not dry_run:
        _print_generated(state)
    if dry_run:
        print(f"# {path}: dry run, nothing written; secrets shown as ****")
        print(doc.render_masked(), end="")
        return 0
    if doc.changed or not path.exists():
        try:
            backup = atomic_write(path, doc.render())
        except OSError as exc:
            _err(f"{path}: cannot write the configuration file: {exc.strerror or exc}")
            return 2
        print(f"Wrote {path} (mode 0600)" + (f"; the previous file is {backup}" if backup else ""))
    else:
        print(f"No changes: {path} left as it was")
    code = check_written(path)
    if code == 0:
        print("\n".join(next_steps(cfg, path)))
    return code


def _print_generated(state: State) -> None:
    for key in sorted(state.generated):
        value = state.values[key]
        shown = value[0] if isinstance(value, list) else value
        print(f"Generated {key}: {shown}")
        print("WARNING: store it now; it is shown only this once (it is in the file, mode 0600).")


def _cannot_write(path: Path) -> bool:
    """True when writing `path` will fail for permissions: say so before asking anything."""
    target = path if path.exists() else path.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    return not os.access(target, os.W_OK)


def setup_command(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if not args.dry_run and _cannot_write(path):
        _err(
            f"{path}: cannot write the configuration file: permission denied (run as root, "
            "give --config FILE, or --dry-run)"
        )
        return 2
    try:
        doc = ConfigDocument.load(path)
        answers: list[tuple[str, Any]] = []
        if args.answers:
            answers += read_answers(args.answers)
        answers += parse_settings(args.settings)
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return 2
    first_run = not doc.original.strip()
    if first_run:
        doc = ConfigDocument(NEW_FILE_HEADER, path)
    state = initial_state(doc.get, host_addresses())
    if answers:
        state.interactive = False
        try:
            apply_settings(doc, state, answers)
        except AnswerError as exc:
            _err(str(exc))
            return 2
        return _finish(doc, path, args.dry_run, state)

    if sys.stdin is None:  # `confedge setup <&-`: no terminal, no pipe, nobody to ask
        _err(
            "standard input is closed, so the questions cannot be answered; give the answers "
            "with --answers FILE or --set KEY=VALUE (nothing written)"
        )
        return 2
    host_defaults(state, doc.get, host_names())
    before = dict(state.values)
    print("confedge setup: " + ("a new configuration" if first_run else f"changing {path}"))
    print(f"  {path}: Enter keeps the value in [brackets]; Ctrl-C stops without writing.")
    try:
        ask_all(state, prompter())
        changed = summary(state, before)
        if first_run:
            changed = [q.key for q in QUESTIONS[1:] if q.applies(state)] + [
                k for k in changed if k not in {q.key for q in QUESTIONS}
            ]
        try:
            cfg = apply_and_validate(doc, state, changed)
        except ConfigError as exc:
            for line in exc.problems:
                _err(line)
            return 2
        words, commands = _tls_words(cfg, path)
        print(wrap(f"Certificate: {words}{'' if commands else '.'}", "", "  "))
        for c in commands:
            print(f"    {c}")
        verb = "Print" if args.dry_run else "Write"
        answer = prompter().ask(f"{verb} {path}? [Y/n]: ", ["yes", "no"], False).strip()
    except Cancelled:
        print("Cancelled: nothing written.")
        return 1
    if answer.lower() in ("n", "no"):
        print("Nothing written.")
        return 1
    return _finish(doc, path, args.dry_run)


def apply_and_validate(doc: ConfigDocument, state: State, keys: list[str]) -> Config:
    apply_answers(doc, state, keys)
    return doc.validate()


def import_reference_command(args: argparse.Namespace) -> int:
    from .reference import import_reference

    return import_reference(args)
