"""`confedge cert show|install|self-signed`: certificates as operator commands (SPEC §5).

Why commands and not "edit [tls] and send SIGHUP": the reference appliance's only path is its
wizard, which overwrites whatever is installed; hand-editing gives no feedback until a browser
complains. `install` runs every check of tls/certs.py in its strict form (the name must cover
this host, the chain must be complete) *before* touching anything, says in one line what is
wrong, and otherwise writes the files atomically into `server.state_dir/tls/`, points `[tls]` at
them (tomlkit: the operator's comments and key order stay) and makes the running service reload
(SIGHUP to the pid in `server.state_dir/confedge.pid`). Nothing here starts a listener.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from confedge.config import Config, ConfigError, parse_config
from confedge.opcommand import add_action, add_common_options
from confedge.tls.certs import (
    SELF_SIGNED_NAME,
    CertificateError,
    certificate_names,
    check_pem,
    check_tls_config,
    configured_certificates,
    ensure_self_signed,
    key_description,
    read_pem_file,
    sni_map,
    split_pem,
    system_roots,
    write_private,
)
from confedge.tls.context import generated_names

__all__ = ["INSTALLED_CERT", "INSTALLED_KEY", "cert_command", "configure_parser"]

audit = logging.getLogger("confedge.tls.audit")

# Where `cert install` puts the operator's certificate, beside the generated one.
INSTALLED_CERT = "server.pem"
INSTALLED_KEY = "server.key"


class Refused(Exception):
    """One line telling the operator why nothing was changed (exit status 2)."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The actions of `confedge cert` (cli.py registers the command itself)."""
    add_common_options(p)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    add_action(
        sub,
        "show",
        "the certificates in use: names, issuer, expiry, key, chain, SNI",
        "Print the certificates the configuration serves: subject, names, issuer, validity "
        "(days left), key type and size, each certificate of the chain, and which SNI names "
        "select which certificate.",
    )
    inst = add_action(
        sub,
        "install",
        "check and install a certificate, then reload the running service",
        "Check a certificate (key matches, chain order and completeness, names cover this "
        "host, validity, key strength), then install it into STATE_DIR/tls/, point [tls] at "
        "it and reload the running confedge. On any problem: one line saying what is wrong, "
        "exit status 2, nothing changed.",
    )
    inst.add_argument(
        "--cert",
        required=True,
        metavar="PEM",
        help="the server certificate (may also hold the intermediates and the key)",
    )
    inst.add_argument(
        "--key", metavar="PEM", help="its private key, unencrypted (default: inside --cert)"
    )
    inst.add_argument(
        "--chain",
        metavar="PEM",
        help="the intermediate certificates, each followed by the one that signed it",
    )
    ss = add_action(
        sub,
        "self-signed",
        "generate a new self-signed certificate for this host and reload",
        "Generate a new self-signed certificate for the host's FQDN in "
        "STATE_DIR/tls/selfsigned.pem and reload the running confedge. An installed "
        "certificate ([tls] cert set) is replaced only with --force.",
    )
    ss.add_argument(
        "--force",
        action="store_true",
        help="also when [tls] names an installed certificate (it is then no longer used)",
    )


def cert_command(cfg: Config, config_path: str, args: argparse.Namespace, out: TextIO) -> int:
    """Run `confedge cert ACTION`; return the exit status (0 ok, 1 failure, 2 refused)."""
    now = dt.datetime.now(dt.UTC)
    try:
        if args.action == "show":
            return _show(cfg, now, out)
        if args.action == "install":
            return _install(cfg, config_path, args, now, out)
        return _self_signed(cfg, config_path, bool(args.force), now, out)
    except Refused as exc:
        print(f"confedge cert {args.action}: refused: {exc}", file=sys.stderr)
        return 2
    except (CertificateError, OSError) as exc:
        print(f"confedge cert {args.action}: {exc}", file=sys.stderr)
        return 1


# -- show ------------------------------------------------------------------------------------------


def _days_left(not_after: dt.datetime, now: dt.datetime) -> str:
    left = not_after - now
    if left.total_seconds() <= 0:
        return "EXPIRED"
    return f"{left.days} days left"


def _describe(pem: bytes, key_pem: bytes | None, now: dt.datetime, out: TextIO) -> tuple[str, ...]:
    """Print one certificate file's chain; return the leaf's names."""
    blocks, key_blocks = split_pem(pem)
    chain = [x509.load_pem_x509_certificate(b) for b in blocks]
    if not chain:
        print("  (no certificate in the file)", file=out)
        return ()
    leaf = chain[0]
    names = certificate_names(leaf)
    keys = key_blocks or (split_pem(key_pem)[1] if key_pem else [])
    key_text = key_description(leaf.public_key())
    if not keys:
        key_text += "  (private key not found)"
    rows = [
        ("subject", leaf.subject.rfc4514_string()),
        ("names", ", ".join(names) or "none"),
        (
            "issuer",
            leaf.issuer.rfc4514_string()
            + ("  (self-signed)" if leaf.issuer == leaf.subject else ""),
        ),
        (
            "valid",
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            f"({_days_left(leaf.not_valid_after_utc, now)})",
        ),
        ("key", key_text),
        ("sha256", hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()),
    ]
    for label, value in rows:
        print(f"  {label + ':':<9} {value}", file=out)
    print("  chain:", file=out)
    for i, c in enumerate(chain, start=1):
        print(
            f"    {i}. {c.subject.rfc4514_string()}  issued by {c.issuer.rfc4514_string()}  "
            f"until {c.not_valid_after_utc:%Y-%m-%d} ({_days_left(c.not_valid_after_utc, now)})",
            file=out,
        )
    return names


def _read_optional(path: str, kind: str) -> bytes | None:
    """The file's PEM, or None when there is none to read (the problem lines say why)."""
    try:
        return read_pem_file(path, path, kind) if path else None
    except CertificateError:
        return None


def _show(cfg: Config, now: dt.datetime, out: TextIO) -> int:
    problems, warnings = check_tls_config(cfg, now)
    entries = configured_certificates(cfg)  # (label, cert path, key path)
    if not cfg.tls.cert and not (entries and entries[0][0].startswith("default")):
        generated = Path(cfg.server.state_dir) / "tls" / SELF_SIGNED_NAME
        print(
            f"default: none yet; `confedge run` generates a self-signed certificate for "
            f"{cfg.server.fqdn} in {generated} (or run `confedge cert self-signed`)",
            file=out,
        )
    named: list[tuple[str, tuple[str, ...]]] = []
    for label, cert_path, key_path in entries:
        print(f"{label}: {cert_path}" + (f" (key {key_path})" if key_path else ""), file=out)
        pem = _read_optional(cert_path, "certificate")
        if pem is None:
            print("  (cannot read the file)", file=out)
            continue
        try:
            named.append((label, _describe(pem, _read_optional(key_path, "private key"), now, out)))
        except ValueError as exc:
            print(f"  (cannot parse the certificate: {exc})", file=out)
    if named:
        exact, wildcard = sni_map(named)
        print("SNI (server name -> certificate):", file=out)
        if len(named) == 1:
            print(f"  every name -> {named[0][0]}", file=out)
        else:
            for name, label in exact.items():
                print(f"  {name} -> {label}", file=out)
            for parent, label in wildcard.items():
                print(f"  *.{parent} -> {label}", file=out)
            print(f"  any other name, or none -> {named[0][0]}", file=out)
    for line in warnings:
        print(f"warning: {line}", file=out)
    for line in problems:
        print(f"problem: {line}", file=out)
    return 1 if problems else 0


# -- install -----------------------------------------------------------------------------------


def _install(
    cfg: Config, config_path: str, args: argparse.Namespace, now: dt.datetime, out: TextIO
) -> int:
    try:
        cert_pem = read_pem_file(args.cert, "--cert", "certificate")
        chain_pem = read_pem_file(args.chain, "--chain", "certificate") if args.chain else b""
        key_pem = read_pem_file(args.key, "--key", "private key") if args.key else None
    except CertificateError as exc:
        raise Refused(str(exc)) from None
    if args.chain and not split_pem(chain_pem)[0]:
        raise Refused("--chain: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    where = "--cert + --chain" if args.chain else "--cert"
    bundle = cert_pem.rstrip(b"\n") + b"\n" + chain_pem
    try:
        info = check_pem(
            bundle,
            key_pem,
            now,
            expected_name=cfg.server.fqdn,
            where=where,
            key_where="--key",
            require_name=True,
            trusted=system_roots(),
        )
    except CertificateError as exc:
        raise Refused(str(exc)) from None
    cert_blocks, key_blocks = split_pem(bundle)
    if key_pem is not None:
        key_blocks = split_pem(key_pem)[1]
    # Normalised files: certificates only (leaf first) in one, the key alone (0600) in the other.
    certs_out = b"".join(b.rstrip(b"\n") + b"\n" for b in cert_blocks)
    key_out = key_blocks[0].rstrip(b"\n") + b"\n"
    directory = Path(cfg.server.state_dir) / "tls"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / INSTALLED_CERT, directory / INSTALLED_KEY
    # The key first: until the certificate is replaced too the files do not match, which only
    # a reload in between could notice, and it would refuse them and keep the old pair.
    write_private(key_path, key_out)
    write_private(cert_path, certs_out)
    os.chmod(cert_path, 0o644)
    _give_to_service(cfg, directory, key_path, cert_path)
    _set_tls_paths(config_path, str(cert_path), str(key_path))
    audit.info(
        "certificate installed subject=%s names=%s not_after=%s chain=%d cert=%s by=operator",
        info.subject,
        ",".join(info.names),
        info.not_after.isoformat(),
        info.chain_length,
        cert_path,
    )
    said, took = _reload(cfg)
    print(
        f"installed {info.subject} ({', '.join(info.names)}; valid until "
        f"{info.not_after:%Y-%m-%d}, {_days_left(info.not_after, now)}) as {cert_path}; " + said,
        file=out,
    )
    return 0 if took else 1


def _reload(cfg: Config) -> tuple[str, bool]:
    """SIGHUP the running service and wait for its answer (as `confedge reload` does): the end
    of the result line, and whether the running service took the certificate (or none runs).

    Why wait: the reload is checked again by the service itself (and by each proxy worker), so
    "reloaded" said right after the signal was a guess; a refusal (a file that changed, a
    worker that could not load it) must reach the operator who installed the file."""
    from confedge.opscli import RELOAD_RESULT, RELOAD_WAIT, signal_and_wait

    try:
        pid, answer = signal_and_wait(cfg.server.state_dir, signal.SIGHUP, RELOAD_RESULT)
    except PermissionError:
        return (
            "the running confedge could not be signalled (permission denied): reload it "
            "with `systemctl reload confedge` or `kill -HUP PID`"
        ), False
    if pid is None:
        return "confedge is not running here; it will serve it when started", True
    if answer is None:
        return (
            f"the running confedge (pid {pid}) did not answer the reload within "
            f"{RELOAD_WAIT:g} s; see its log"
        ), False
    if answer.get("ok"):
        return f"reloaded the running confedge (pid {pid})", True
    return (
        f"but the running confedge (pid {pid}) did not take it: {answer.get('reason')} "
        "(`confedge reload` retries)"
    ), False


def _set_tls_paths(config_path: str, cert: str, key: str) -> None:
    """Point [tls] cert/key at the installed files, keeping the rest of the file as written.

    The new text is validated as a whole configuration before it replaces the old file
    (atomically, same mode), so a failure here leaves the file as it was.
    """
    import tomlkit

    path = Path(config_path)
    text = path.read_text(encoding="utf-8-sig")
    doc = tomlkit.parse(text)
    tls = doc.get("tls")
    if tls is not None and tls.get("cert") == cert and tls.get("key") == key:
        return
    if tls is None:
        tls = tomlkit.table()
        doc["tls"] = tls
    tls["cert"] = cert
    tls["key"] = key
    _replace_config(path, tomlkit.dumps(doc))


def _replace_config(path: Path, text: str) -> None:
    try:
        parse_config(tomllib.loads(text))
    except (
        ConfigError,
        tomllib.TOMLDecodeError,
    ) as exc:  # pragma: no cover - tomlkit keeps it valid
        raise OSError(
            f"{path}: the updated configuration would not be valid ({exc}); not written"
        ) from None
    if path.is_symlink():  # a linked configuration: replace its target, not the link
        path = path.resolve()
    st = path.stat()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o777)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
        if os.geteuid() == 0:  # keep e.g. root:confedge 0640 as the operator set it
            os.fchown(fd, st.st_uid, st.st_gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _give_to_service(cfg: Config, *paths: Path) -> None:
    """Run as root (sudo), hand what was written to the owner of server.state_dir: the service
    user (systemd's StateDirectory=), which must read the 0600 key on reload."""
    if os.geteuid() != 0:
        return
    st = Path(cfg.server.state_dir).stat()
    for path in paths:
        os.chown(path, st.st_uid, st.st_gid)


# -- self-signed -----------------------------------------------------------------------------------


def _self_signed(cfg: Config, config_path: str, force: bool, now: dt.datetime, out: TextIO) -> int:
    if cfg.tls.cert and not force:
        raise Refused(
            f"tls.cert names an installed certificate ({cfg.tls.cert}); a self-signed one "
            "replaces it only with --force"
        )
    path, info, _ = ensure_self_signed(
        cfg.server.state_dir, cfg.server.fqdn, generated_names(cfg), now, force=True
    )
    _give_to_service(cfg, path.parent, path)
    if cfg.tls.cert:
        _clear_tls_paths(config_path)
    audit.info(
        "self-signed certificate generated subject=%s not_after=%s replaced=%s by=operator",
        info.subject,
        info.not_after.isoformat(),
        cfg.tls.cert or "generated",
    )
    said, took = _reload(cfg)
    print(
        f"generated a self-signed certificate for {cfg.server.fqdn} in {path} (valid until "
        f"{info.not_after:%Y-%m-%d}); " + said,
        file=out,
    )
    return 0 if took else 1


def _clear_tls_paths(config_path: str) -> None:
    """[tls] cert = "" and key = "": serve the generated certificate (SPEC §8)."""
    import tomlkit

    path = Path(config_path)
    doc = tomlkit.parse(path.read_text(encoding="utf-8-sig"))
    tls = doc["tls"]
    tls["cert"] = ""
    if "key" in tls:
        tls["key"] = ""
    _replace_config(path, tomlkit.dumps(doc))
