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

from confedge.config import Config
from confedge.tls.certs import CertificateInfo, ensure_self_signed, load_certificate

__all__ = ["TLSContextHolder", "client_context", "server_context"]

log = logging.getLogger("confedge.tls")

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


class TLSContextHolder:
    """The listeners' SSLContext, reloadable from the configuration at run time."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.info: CertificateInfo
        self.certfile = ""
        self._current = self._build()
        # The outer context is the one given to create_server; it hands each handshake over to
        # the current one. It must hold a certificate itself for OpenSSL to accept it.
        self.context = self._current
        self.context.sni_callback = self._select

    def _build(self) -> ssl.SSLContext:
        cfg = self._cfg
        now = dt.datetime.now(dt.UTC)
        fqdn = cfg.server.fqdn
        if cfg.tls.cert:
            info = load_certificate(cfg.tls.cert, cfg.tls.key, now, expected_name=fqdn)
            certfile, keyfile = cfg.tls.cert, cfg.tls.key or None
        else:
            names = [
                cfg.server.hostname,
                "localhost",
                cfg.server.internal_address,
                "127.0.0.1",
                "::1",
            ]
            if cfg.server.external_address:
                names.append(cfg.server.external_address)
            path, info, created = ensure_self_signed(cfg.server.state_dir, fqdn, names, now)
            if created:
                log.warning("generated a self-signed certificate for %s in %s", fqdn, path)
            certfile, keyfile = str(path), None
        for w in info.warnings:
            log.warning("%s", w)
        self.info = info
        self.certfile = certfile
        try:
            return server_context(certfile, keyfile)
        except ssl.SSLError as exc:
            from confedge.tls.certs import CertificateError

            raise CertificateError(
                f"tls.cert: OpenSSL refused the certificate/key: {exc}"
            ) from None

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._current is not ctx:
            sslobj.context = self._current

    def reload(self, cfg: Config | None = None) -> CertificateInfo:
        """Load the certificate again (new handshakes use it; open connections are untouched).

        On error the old context stays in service and CertificateError propagates.
        """
        if cfg is not None:
            self._cfg = cfg
        new = self._build()
        new.sni_callback = self._select
        self._current = new
        log.info(
            "TLS certificate reloaded: %s, valid until %s", self.info.subject, self.info.not_after
        )
        return self.info
