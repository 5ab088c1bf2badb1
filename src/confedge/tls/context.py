"""SSLContext factories: the Mozilla "intermediate" server profile, the upstream client context,
and a holder that swaps certificates without restarting listeners.

Why a holder: asyncio binds one SSLContext to a listening server for its whole life. Setting an
SNI callback on that context that points each new connection at the *current* context
(`ssl_object.context = ...`) lets a reload (SIGHUP, `confedge cert`) take effect for new
handshakes while connections in flight keep theirs (SPEC §5 "reload without dropping
connections"). OpenSSL calls the servername callback for every ClientHello, with or without SNI.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

from confedge.config import Config
from confedge.tls.certs import (
    CertificateError,
    CertificateInfo,
    ensure_self_signed,
    load_certificate,
    load_sni_certificates,
    sni_map,
)

__all__ = ["TLSContextHolder", "TLSState", "client_context", "generated_names", "server_context"]

log = logging.getLogger("confedge.tls")

_REPEAT_AFTER = 86400.0  # seconds before the same certificate warning is logged again
_warned: dict[str, float] = {}  # warning text -> when it was last logged (time.monotonic)


def _warn(text: str) -> None:
    """A certificate warning ("expires soon", a name it does not cover), once a day per text.

    Every reload builds the contexts again, in the proxy, in TURN and in each proxy worker: the
    same unchanged certificate said the same thing three or more times per SIGHUP (200 reloads,
    600 lines). A different certificate (another date or name in the text) is said at once."""
    now = time.monotonic()
    if now - _warned.get(text, -_REPEAT_AFTER) >= _REPEAT_AFTER:
        _warned[text] = now
        log.warning("%s", text)


# Mozilla Server Side TLS, "intermediate" (v5.7): TLS 1.2 suites are ECDHE with AES-GCM or
# ChaCha20-Poly1305 only; TLS 1.3 suites are OpenSSL's defaults (all AEAD). The DHE suites of the
# profile are left out on purpose: they need a dhparam file and every intermediate-era client
# negotiates ECDHE.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose `read`, `write` and `pending` are the C methods of the TLS
    connection itself, not ssl.py's Python wrappers around them.

    Why: a TLS transport (uvloop's and asyncio's SSLProtocol) binds `read`, `write` and
    `pending` once per connection and calls them for every record it decrypts or encrypts;
    through ssl.py each call is an interpreted Python frame that only forwards its arguments
    (in the proxy benchmark, about 7% of a worker's samples were in those three wrappers). The
    C methods do the same with the arguments the transports pass (`read(n)`, `read(n,
    buffer)`, `write(data)`, `pending()`); only a bare `read()` without a size, which no
    transport makes, is not accepted. Everything else (ALPN, SNI's context switch, peer
    certificate, unwrap) is ssl.SSLObject's own.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        conn = obj._sslobj  # type: ignore[attr-defined]
        vars(obj).update(read=conn.read, write=conn.write, pending=conn.pending)
        return obj


def server_context(
    certfile: str, keyfile: str | None = None, *, alpn: tuple[str, ...] = ("http/1.1",)
) -> ssl.SSLContext:
    """A TLS 1.2/1.3 server context with the intermediate profile (SPEC §2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    # Mozilla intermediate allows only X25519, P-256 and P-384 key exchange; OpenSSL's default list
    # also offers X448 and P-521. Python 3.11 has no set1_groups binding; set_ecdh_curve sets the
    # group list (TLS 1.2 and 1.3) to P-256 alone, which every client supports.
    ctx.set_ecdh_curve("prime256v1")
    # Mozilla intermediate: session tickets off (their keys never rotate in a long-lived process,
    # which would defeat forward secrecy); the server-side session cache still gives resumption.
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.num_tickets = 0
    ctx.sslobject_class = DirectSSLObject
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.load_cert_chain(certfile, keyfile or None)
    return ctx


def client_context(verify: bool) -> ssl.SSLContext:
    """The context for connections to conferencing nodes.

    Verification is off by default like the reference (nodes usually carry self-signed or
    internal-CA certificates); `proxy.verify_upstream = true` turns it on with the system CAs.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True)
class _Selection:
    """The contexts one configuration serves, replaced as a whole on reload."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]  # "meet.example.com" -> its certificate's context
    wildcard: dict[str, ssl.SSLContext]  # "example.com" for a "*.example.com" certificate


@dataclass(frozen=True)
class TLSState:
    """Everything a TLSContextHolder serves, as one value (TLSContextHolder.restore)."""

    cfg: Config
    selection: _Selection
    info: CertificateInfo
    infos: list[CertificateInfo]
    certfile: str


class TLSContextHolder:
    """The listeners' SSLContext, reloadable from the configuration at run time.

    Several certificates (SPEC §5, `[[tls.certificates]]`): each gets its own SSLContext, and
    the servername callback hands a handshake to the one whose certificate names the SNI
    (RFC 6066 §3) -- exact names first, then a wildcard covering one left-most label (RFC 6125
    §6.4.3) -- or to the default certificate ([tls] cert, or the generated one) when none does
    or the client sent no SNI. The default certificate's own names are looked up first, so an
    extra certificate never takes over a name the default one serves.
    """

    def __init__(self, cfg: Config, *, alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        """`alpn`: the protocols offered, in the server's order of preference (the proxy's
        HTTPS listener adds "stun.turn" first with turn.tls_on_https, RFC 7443 §4)."""
        self._cfg = cfg
        self._alpn = alpn
        self.info: CertificateInfo
        self.infos: list[CertificateInfo] = []
        self.certfile = ""
        self._sel = self._build()
        # The outer context is the one given to create_server; it hands each handshake over to
        # the selected one. It must hold a certificate itself for OpenSSL to accept it.
        self.context = self._sel.default
        self.context.sni_callback = self._select

    def _build(self) -> _Selection:
        cfg = self._cfg
        now = dt.datetime.now(dt.UTC)
        fqdn = cfg.server.fqdn
        if cfg.tls.cert:
            info = load_certificate(cfg.tls.cert, cfg.tls.key, now, expected_name=fqdn)
            certfile, keyfile = cfg.tls.cert, cfg.tls.key or None
        else:
            path, info, created = ensure_self_signed(
                cfg.server.state_dir, fqdn, generated_names(cfg), now
            )
            if created:
                log.warning("generated a self-signed certificate for %s in %s", fqdn, path)
            certfile, keyfile = str(path), None
        extra, sni_warnings = load_sni_certificates(cfg, now, info.names)
        for w in info.warnings:
            _warn(w)
        for _, _, extra_info in extra:
            for w in extra_info.warnings:
                _warn(w)
        for w in sni_warnings:
            _warn(w)
        default = _context(certfile, keyfile, "tls.cert", self._alpn)
        pairs = [(default, info)]
        for i, (cert, key, extra_info) in enumerate(extra):
            pairs.append(
                (_context(cert, key or None, f"tls.certificates[{i}].cert", self._alpn), extra_info)
            )
        by_label = {str(i): ctx for i, (ctx, _) in enumerate(pairs)}
        exact_labels, wildcard_labels = sni_map(
            [(str(i), ci.names) for i, (_, ci) in enumerate(pairs)]
        )
        exact = {name: by_label[label] for name, label in exact_labels.items()}
        wildcard = {name: by_label[label] for name, label in wildcard_labels.items()}
        self.info = info
        self.infos = [ci for _, ci in pairs]
        self.certfile = certfile
        if len(pairs) == 1:
            exact, wildcard = {}, {}  # one certificate: nothing to choose
        return _Selection(default, exact, wildcard)

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sel = self._sel
        target = sel.default
        if server_name and (sel.exact or sel.wildcard):
            name = server_name.lower().rstrip(".")
            found = sel.exact.get(name)
            if found is None:
                _, dot, parent = name.partition(".")
                if dot:
                    found = sel.wildcard.get(parent)
            if found is not None:
                target = found
        if target is not ctx:
            sslobj.context = target

    def in_service(self) -> TLSState:
        """What serves now, to put back with restore()."""
        return TLSState(self._cfg, self._sel, self.info, list(self.infos), self.certfile)

    def restore(self, state: TLSState) -> None:
        """Serve `state` (from in_service()) again: no file is read.

        Why from memory: a proxy worker that loaded a new certificate goes back to the one it
        served before when another worker could not load the same files (ProxyService.
        reload_tls). The files are usually the same paths with new content, so loading the
        "old" [tls] section again would read the new (or half-written) files once more.
        """
        self._cfg, self._sel, self.info, self.certfile = (
            state.cfg, state.selection, state.info, state.certfile,
        )  # fmt: skip
        self.infos = list(state.infos)
        log.info(
            "TLS certificate put back: %s, valid until %s", self.info.subject, self.info.not_after
        )

    def reload(self, cfg: Config | None = None) -> CertificateInfo:
        """Load the certificates again (new handshakes use them; open connections are untouched).

        On error the old contexts stay in service and CertificateError propagates.
        """
        old = self._cfg
        if cfg is not None:
            self._cfg = cfg
        try:
            sel = self._build()
        except BaseException:
            self._cfg = old  # a later plain reload retries what is in service, not this
            raise
        sel.default.sni_callback = self._select
        self._sel = sel
        log.info(
            "TLS certificate reloaded: %s, valid until %s%s",
            self.info.subject,
            self.info.not_after,
            f" (+{len(self.infos) - 1} chosen by SNI)" if len(self.infos) > 1 else "",
        )
        return self.info


def generated_names(cfg: Config) -> list[str]:
    """The names of the generated certificate besides the FQDN: the host name, loopback and the
    listener addresses, so that browsers on the host and on either network can reach it."""
    names = [cfg.server.hostname, "localhost", cfg.server.internal_address, "127.0.0.1", "::1"]
    if cfg.server.external_address:
        names.append(cfg.server.external_address)
    return names


def _context(
    certfile: str, keyfile: str | None, where: str, alpn: tuple[str, ...]
) -> ssl.SSLContext:
    # Every SNI-selected context offers the same ALPN list: OpenSSL selects ALPN after the
    # servername callback has switched contexts, with the callback of the context switched to.
    try:
        return server_context(certfile, keyfile, alpn=alpn)
    except ssl.SSLError as exc:
        raise CertificateError(f"{where}: OpenSSL refused the certificate/key: {exc}") from None
