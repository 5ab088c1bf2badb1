"""Certificates: self-signed generation, PEM loading and the checks SPEC §5 asks for.

Why checks of our own before handing files to OpenSSL: `SSLContext.load_cert_chain` fails with
messages like "[SSL: KEY_VALUES_MISMATCH]" or, worse, succeeds with a chain in the wrong order that
only some clients reject. An operator installing a certificate on a DMZ host needs to be told
which file is wrong and how, so every check here produces one sentence naming the problem and the
fix. The functions that inspect PEM data are pure (they take `now`); only `ensure_self_signed` and
`load_certificate` touch the filesystem.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from confedge.config import Config

__all__ = [
    "CertificateError",
    "CertificateInfo",
    "certificate_names",
    "check_pem",
    "check_tls_config",
    "configured_certificates",
    "ensure_self_signed",
    "generate_self_signed",
    "key_description",
    "leaf_summary",
    "load_certificate",
    "load_sni_certificates",
    "read_pem_file",
    "sni_map",
    "sni_names",
    "split_pem",
    "system_roots",
    "write_private",
]

SELF_SIGNED_NAME = "selfsigned.pem"
# Mozilla's intermediate profile allows at most 366 days (sslyze checks it); regenerated when near
# expiry, so a short life costs nothing.
SELF_SIGNED_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
# A PEM bundle with a long chain is a few KiB; anything this large is the wrong file (a log, a
# disk image), and reading it whole would only cost memory.
MAX_PEM_BYTES = 1024 * 1024
# Key strength floor (NIST SP 800-57 Part 1 §5.6.2: 112-bit security until 2030; RSA 2048 and
# P-256 are the smallest that reach it). Debian's OpenSSL (security level 2) refuses weaker keys
# in a handshake anyway, with a message no operator can act on.
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256


class CertificateError(OSError):
    """A certificate or key that cannot be used, with a message saying what to fix.

    An OSError (like the missing or unreadable file it often is), so that every "cannot start"
    path that reports OSError as one line -- `confedge run` does -- reports this one too;
    ``str()`` is the message alone.
    """


@dataclass(frozen=True)
class CertificateInfo:
    """What was loaded: the leaf's names and validity, plus non-fatal warnings to log."""

    subject: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    chain_length: int
    self_signed: bool
    warnings: tuple[str, ...] = field(default=())


def split_pem(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """Return (certificate blocks, private-key blocks) in file order."""
    certs: list[bytes] = []
    keys: list[bytes] = []
    for m in _PEM_BLOCK.finditer(data):
        kind = m.group(1)
        if kind in (b"CERTIFICATE", b"TRUSTED CERTIFICATE"):
            certs.append(m.group(0))
        elif kind.endswith(b"PRIVATE KEY"):
            keys.append(m.group(0))
    return certs, keys


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The subjectAltName DNS names, then IP addresses, of `cert` (what clients match)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    out += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    return tuple(out)


def _name_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower(), host.lower()
    if pattern == host:
        return True
    # RFC 6125 §6.4.3: a wildcard covers exactly one left-most label.
    if pattern.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == pattern[2:]
    return False


def _public_bytes(key: object) -> bytes:
    pub = key.public_key()  # type: ignore[attr-defined]
    return bytes(
        pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def key_description(key: object) -> str:
    """ "RSA 2048 bits", "EC secp256r1 (256 bits)", "Ed25519": for messages and `cert show`."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bits)"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _weak_key(key: object) -> str | None:
    """Why `key` is too weak to serve, or None."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        return f"RSA {key.key_size} bits, too weak (at least {MIN_RSA_BITS})"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size < MIN_EC_BITS:
        return f"EC {key.curve.name}, too weak (at least P-256)"
    return None


def system_roots() -> list[x509.Certificate]:
    """The root certificates this host trusts (OpenSSL's default CA file), for the chain
    completeness check; [] when there is no readable bundle."""
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if not name:
            continue
        try:
            data = Path(name).read_bytes()
            with warnings.catch_warnings():
                # A few distribution roots have a negative serial; they still identify issuers.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                return x509.load_pem_x509_certificates(data)
        except (OSError, ValueError):
            continue
    return []


def _check_complete(
    chain: list[x509.Certificate], trusted: list[x509.Certificate], where: str
) -> None:
    """Refuse a chain that stops short of a root (RFC 8446 §4.4.2: the server sends every
    intermediate; clients do not fetch missing ones, except some browsers, so the gap shows
    only on phones and API clients). The chain is complete when its last certificate is
    self-issued (a root, or a self-signed leaf) or was signed by a root this host trusts."""
    last = chain[-1]
    if last.issuer == last.subject:
        return
    for root in trusted:
        if root.subject != last.issuer:
            continue
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, Exception):  # noqa: S112 - try the next root of that name
            continue
        return
    raise CertificateError(
        f"{where}: the chain is incomplete: certificate {len(chain)} "
        f"({last.subject.rfc4514_string()}) was issued by {last.issuer.rfc4514_string()}, which "
        "is neither in the files nor a root this host trusts; add the intermediate certificate(s) "
        "(--chain), or the root of a private CA"
    )


def _load_key(block: bytes, where: str) -> object:
    try:
        return serialization.load_pem_private_key(block, password=None)
    except TypeError:
        raise CertificateError(
            f"{where}: the private key is encrypted; confedge needs an unencrypted key "
            "(decrypt it with: openssl pkey -in KEY -out KEY.plain)"
        ) from None
    except (ValueError, Exception) as exc:  # cryptography raises several types for bad keys
        raise CertificateError(f"{where}: the private key cannot be read: {exc}") from None


def check_pem(
    cert_pem: bytes,
    key_pem: bytes | None,
    now: dt.datetime,
    *,
    expected_name: str | None = None,
    where: str = "tls.cert",
    key_where: str = "tls.key",
    require_name: bool = False,
    trusted: list[x509.Certificate] | None = None,
) -> CertificateInfo:
    """Check a certificate chain and its key as SPEC §5 asks; raise CertificateError if unusable.

    `cert_pem` holds the leaf first, then intermediates (RFC 8446 §4.4.2: "The sender's
    certificate MUST come in the first CertificateEntry ... each following certificate SHOULD
    directly certify the one immediately preceding it"). `key_pem` None means the key must be in
    `cert_pem` (the reference's one-PEM layout).

    `confedge cert install` is stricter than a start: `require_name` makes a certificate that
    does not name `expected_name` an error (at start it is a warning, so that a renamed host
    still serves), and `trusted` (the host's roots) turns on the chain completeness check.
    """
    cert_blocks, key_blocks = split_pem(cert_pem)
    if not cert_blocks:
        if key_blocks and key_pem is not None and split_pem(key_pem)[0]:
            raise CertificateError(
                f"{where}: holds a private key and {key_where} holds the certificate; "
                "tls.cert and tls.key are swapped"
            )
        raise CertificateError(
            f"{where}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)"
        )
    chain: list[x509.Certificate] = []
    for i, block in enumerate(cert_blocks):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise CertificateError(
                f"{where}: certificate {i + 1} in the file cannot be read (damaged or truncated "
                "PEM); copy it again from what your certificate authority issued"
            ) from None
    if key_pem is not None:
        _, key_blocks = split_pem(key_pem)
        if not key_blocks:
            raise CertificateError(
                f"{key_where}: no PEM private key found (expected -----BEGIN ... PRIVATE KEY-----)"
            )
    if not key_blocks:
        raise CertificateError(
            f"{where}: no private key in the file; set {key_where} or append the key to the PEM"
        )
    if len(key_blocks) > 1:
        raise CertificateError(
            f"{key_where if key_pem is not None else where}: more than one private key found"
        )
    key = _load_key(key_blocks[0], key_where if key_pem is not None else where)
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertificateError(f"{key_where}: unsupported private key type {type(key).__name__}")
    weak = _weak_key(key)
    if weak is not None:
        raise CertificateError(
            f"{key_where if key_pem is not None else where}: the key is {weak}; "
            "have the certificate reissued for an RSA 2048+ or EC P-256 key"
        )
    leaf = chain[0]
    leaf_pub = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if _public_bytes(key) != leaf_pub:
        # Maybe the order is wrong: the key belongs to another certificate of the file.
        for i, c in enumerate(chain[1:], start=1):
            if c.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) == _public_bytes(key):
                raise CertificateError(
                    f"{where}: the certificate matching the key is number {i + 1} in the file; "
                    "the server certificate must come first, followed by its intermediates"
                )
        raise CertificateError(
            f"{where}: the private key does not match the certificate "
            f"(subject {leaf.subject.rfc4514_string()}); install the key that was used for its CSR"
        )
    for i in range(len(chain) - 1):
        child, parent = chain[i], chain[i + 1]
        if child.issuer != parent.subject:
            raise CertificateError(
                f"{where}: chain order is wrong: certificate {i + 1} "
                f"({child.subject.rfc4514_string()}) was issued by "
                f"{child.issuer.rfc4514_string()}, "
                f"but certificate {i + 2} is {parent.subject.rfc4514_string()}; "
                "put the leaf first, then each issuer after the certificate it signed"
            )
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as exc:
            # InvalidSignature has no text: say what it means and what to do.
            why = str(exc) or "its signature does not verify with that certificate's key"
            raise CertificateError(
                f"{where}: certificate {i + 2} ({parent.subject.rfc4514_string()}) did not "
                f"sign certificate {i + 1} ({why}); it has the issuer's name but another key: "
                "get the intermediate your CA issued with this certificate"
            ) from None
    not_before = leaf.not_valid_before_utc
    not_after = leaf.not_valid_after_utc
    if now < not_before:
        raise CertificateError(
            f"{where}: the certificate is not valid before {not_before.isoformat()} "
            "(check this host's clock, or install a certificate valid now)"
        )
    if now >= not_after:
        raise CertificateError(
            f"{where}: the certificate expired on {not_after.isoformat()}; install a renewed one"
        )
    warnings: list[str] = []
    if not_after - now < RENEW_BEFORE:
        warnings.append(f"{where}: the certificate expires soon ({not_after.isoformat()})")
    names = certificate_names(leaf)
    if expected_name and not any(_name_matches(n, expected_name) for n in names):
        if require_name:
            raise CertificateError(
                f"{where}: the certificate does not name this host, {expected_name} "
                f"(names: {', '.join(names) or 'none'}); get one that lists it, or set "
                "server.hostname and server.domain to the name it was issued for"
            )
        warnings.append(
            f"{where}: the certificate does not name {expected_name} "
            f"(names: {', '.join(names) or 'none'}); "
            "browsers will warn"
        )
    if trusted is not None:
        _check_complete(chain, trusted, where)
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        names=names,
        not_before=not_before,
        not_after=not_after,
        chain_length=len(chain),
        self_signed=leaf.issuer == leaf.subject,
        warnings=tuple(warnings),
    )


def generate_self_signed(
    fqdn: str, extra_names: list[str], now: dt.datetime, *, days: int = SELF_SIGNED_DAYS
) -> bytes:
    """Return one PEM with an ECDSA P-256 key and a self-signed certificate for `fqdn`.

    P-256 rather than RSA: the handshake's signature costs the server ~10x less CPU, and every
    browser of the last decade supports it. The FQDN is the subject CN and the first SAN (browsers
    only read SANs, RFC 6125 §6.4.4); `extra_names` (hostname, localhost, listener addresses) are
    added as DNS or IP SANs.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in [fqdn, *extra_names]:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def ensure_self_signed(
    state_dir: str | os.PathLike[str],
    fqdn: str,
    extra_names: list[str],
    now: dt.datetime,
    *,
    force: bool = False,
) -> tuple[Path, CertificateInfo, bool]:
    """Reuse the generated certificate in `state_dir`, or create it (0600) if missing or stale.

    Returns (path, info, created). Regenerated when unreadable, expiring within 30 days, or not
    naming `fqdn` any more (the host was renamed): it is ours, so replacing it loses nothing.
    `force` regenerates it anyway (`confedge cert self-signed`).
    """
    directory = Path(state_dir) / "tls"
    path = directory / SELF_SIGNED_NAME
    if path.exists() and not force:
        try:
            info = check_pem(path.read_bytes(), None, now, expected_name=fqdn, where=str(path))
            if not info.warnings:
                return path, info, False
        except (CertificateError, OSError):
            pass
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertificateError(
            f"server.state_dir: cannot create {directory} for the generated certificate: "
            f"{exc.strerror}"
        ) from None
    pem = generate_self_signed(fqdn, extra_names, now)
    write_private(path, pem)
    info = check_pem(pem, None, now, expected_name=fqdn, where=str(path))
    return path, info, True


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600 from the first byte (a key never sits
    readable by others, and a reader sees the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_pem_file(path: str, key: str, kind: str) -> bytes:
    """Read a [tls] file, refusing what cannot be one: a directory, a device or FIFO (reading
    /dev/zero never ends), an empty or huge file, DER where PEM is expected."""
    where = f"{key} ({path})"
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise CertificateError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CertificateError(f"{where}: is a directory; set {key} to the PEM file itself")
    if not stat.S_ISREG(st.st_mode):
        raise CertificateError(f"{where}: is not a regular file; set {key} to a PEM file")
    if st.st_size > MAX_PEM_BYTES:
        raise CertificateError(
            f"{where}: {st.st_size} bytes is too large for a PEM {kind} file; wrong file?"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not data.strip():
        raise CertificateError(f"{where}: the file is empty; it should hold the PEM {kind}")
    if b"-----BEGIN" not in data and data[:1] == b"\x30":
        # An ASN.1 SEQUENCE: the DER encoding, which is what Windows and Java tools export.
        tool = "x509" if kind == "certificate" else "pkey"
        raise CertificateError(
            f"{where}: the {kind} is in binary DER form, confedge needs PEM; convert it with: "
            f"openssl {tool} -inform der -in {path} -out {path}.pem"
        )
    return data


def load_certificate(
    cert_path: str,
    key_path: str,
    now: dt.datetime,
    *,
    expected_name: str | None = None,
    label: str = "tls",
) -> CertificateInfo:
    """Read and check a cert/key pair of [tls] (key_path "" = key inside cert).

    `label` names the pair in messages: "tls" for tls.cert/tls.key, "tls.certificates[1]" for
    an SNI certificate.
    """
    cert_pem = read_pem_file(cert_path, f"{label}.cert", "certificate")
    key_pem: bytes | None = None
    if key_path:
        key_pem = read_pem_file(key_path, f"{label}.key", "private key")
    return check_pem(
        cert_pem,
        key_pem,
        now,
        expected_name=expected_name,
        where=f"{label}.cert ({cert_path})",
        key_where=f"{label}.key ({key_path})" if key_path else f"{label}.key",
    )


def sni_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The DNS names of a certificate that SNI can select (lower case, no IP addresses).

    RFC 6066 §3: a server_name is a DNS host name, never an IP literal, so a certificate's IP
    SANs can only ever be served as the default.
    """
    out: list[str] = []
    for n in names:
        try:
            ipaddress.ip_address(n)
        except ValueError:
            out.append(n.lower().rstrip("."))
    return tuple(out)


def sni_map(
    certificates: list[tuple[str, tuple[str, ...]]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Which certificate serves which SNI name: ({exact name: label}, {wildcard parent: label}).

    `certificates` is [(label, names)] in precedence order, the default certificate first: the
    first certificate naming a host wins (RFC 6066 §3 leaves the choice to the server). The
    TLS listeners (tls/context.py) and `confedge cert show` both use this one rule.
    """
    exact: dict[str, str] = {}
    wildcard: dict[str, str] = {}
    for label, names in certificates:
        for name in sni_names(names):
            if name.startswith("*."):
                wildcard.setdefault(name[2:], label)
            else:
                exact.setdefault(name, label)
    return exact, wildcard


def load_sni_certificates(
    cfg: Config, now: dt.datetime, default_names: tuple[str, ...] = ()
) -> tuple[list[tuple[str, str, CertificateInfo]], list[str]]:
    """Check every [[tls.certificates]] entry; return ([(cert, key, info)], warnings).

    Raises CertificateError naming the entry (tls.certificates[i]) for the first unusable one.
    Warns about a certificate with no DNS name (SNI can never select it) and about names that
    an earlier certificate already serves (the earlier one wins).
    """
    out: list[tuple[str, str, CertificateInfo]] = []
    warnings: list[str] = []
    seen: dict[str, str] = {
        n: "the default certificate (tls.cert)" for n in sni_names(default_names)
    }
    for i, entry in enumerate(cfg.tls.certificates):
        label = f"tls.certificates[{i}]"
        info = load_certificate(entry.cert, entry.key, now, label=label)
        names = sni_names(info.names)
        if not names:
            warnings.append(
                f"{label}.cert ({entry.cert}): the certificate has no DNS names in its "
                "subjectAltName, so no client can select it by SNI"
            )
        for n in names:
            if n in seen:
                warnings.append(
                    f"{label}.cert ({entry.cert}): {n} is already served by {seen[n]}; "
                    "the earlier certificate wins"
                )
            else:
                seen[n] = label
        out.append((entry.cert, entry.key, info))
    return out, warnings


def configured_certificates(cfg: Config) -> list[tuple[str, str, str]]:
    """(label, certificate file, key file) of each certificate [tls] serves: the default
    (tls.cert, else the generated self-signed one once it exists), then each SNI certificate
    (tls.certificates[i]). A key file of "" means the key is in the certificate's file."""
    entries: list[tuple[str, str, str]] = []
    if cfg.tls.cert:
        entries.append(("default (tls.cert)", cfg.tls.cert, cfg.tls.key))
    else:
        generated = Path(cfg.server.state_dir) / "tls" / SELF_SIGNED_NAME
        if generated.exists():
            entries.append(("default (generated, self-signed)", str(generated), ""))
    for i, entry in enumerate(cfg.tls.certificates):
        entries.append((f"tls.certificates[{i}]", entry.cert, entry.key))
    return entries


def leaf_summary(path: str) -> dict[str, object]:
    """The first certificate of a PEM file as plain data for the status page and /metrics:
    subject, issuer, names, not_after (Unix time); or {"problem": ...} when it cannot be read.
    Only the leaf: what a client checks first, and what expires (renewal replaces it)."""
    try:
        pem = read_pem_file(path, path, "certificate")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            leaf = x509.load_pem_x509_certificates(pem)[0]
    except (CertificateError, ValueError, IndexError) as exc:
        return {"problem": str(exc) or "no certificate in the file"}
    return {
        "subject": leaf.subject.rfc4514_string(),
        "issuer": leaf.issuer.rfc4514_string(),
        "names": list(certificate_names(leaf)),
        "not_after": leaf.not_valid_after_utc.timestamp(),
    }


def check_tls_config(cfg: Config, now: dt.datetime) -> tuple[list[str], list[str]]:
    """What `confedge check` can say about [tls] without starting anything.

    Returns (problems, warnings), one sentence each. With no tls.cert configured there is
    nothing to check: a self-signed certificate is generated (or reused) in server.state_dir
    at start.
    """
    problems: list[str] = []
    warnings: list[str] = []
    default_names: tuple[str, ...] = ()
    if not cfg.tls.cert:
        if cfg.tls.key:
            problems.append(
                "tls.key: is set but tls.cert is empty; set tls.cert to the certificate"
            )
    else:
        try:
            info = load_certificate(cfg.tls.cert, cfg.tls.key, now, expected_name=cfg.server.fqdn)
            warnings += info.warnings
            default_names = info.names
        except CertificateError as exc:
            problems.append(str(exc))
    for i, entry in enumerate(cfg.tls.certificates):
        try:
            info = load_certificate(entry.cert, entry.key, now, label=f"tls.certificates[{i}]")
            warnings += info.warnings
        except CertificateError as exc:
            problems.append(str(exc))
    if not problems and cfg.tls.certificates:
        warnings += load_sni_certificates(cfg, now, default_names)[1]
    return problems, warnings
