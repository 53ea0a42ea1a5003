"""TLS contexts for SIP over TLS (RFC 3261 §26.2.1, RFC 5630 for ``sips:`` semantics).

The server context is loaded from the configured PEM certificate (chain) and key, at
TLS 1.2 or newer, and can be *reloaded* in place: the listener keeps one
:class:`ReloadableServerContext` and new handshakes use whatever was loaded last, so a
renewed certificate takes effect on SIGHUP without dropping the connections phones hold.
A reload that fails keeps the old context (a typo must not take the listener down).

Outgoing TLS (to a phone whose connection is gone) does not verify the peer's
certificate: phones present self-signed ones or none, as with every PBX; the phone's
identity is its digest credentials, not its certificate.
"""

from __future__ import annotations

import logging
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

__all__ = ["ReloadableServerContext", "TLSConfigError", "client_context", "load_server_options"]

log = logging.getLogger(__name__)


class TLSConfigError(Exception):
    """The certificate or key cannot be used (names the file and why)."""


def load_server_options(cert: Path, key: Path) -> ssl.CertificateOptions:
    """CertificateOptions from PEM files: the first certificate is the leaf, the rest of
    the file is sent as its chain."""
    try:
        cert_pem = Path(cert).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read sip.tls_cert {cert}: {exc.strerror}") from exc
    try:
        key_pem = Path(key).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read sip.tls_key {key}: {exc.strerror}") from exc
    try:
        chain = _chain_of(cert_pem)
        private = ssl.PrivateCertificate.loadPEM(key_pem + b"\n" + cert_pem)
    except Exception as exc:  # OpenSSL raises several types; all mean "unusable"
        raise TLSConfigError(f"sip.tls_cert/sip.tls_key unusable: {exc}") from exc
    try:
        return ssl.CertificateOptions(
            privateKey=private.privateKey.original.to_cryptography_key(),
            certificate=private.original.to_cryptography(),
            extraCertChain=chain,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as exc:
        raise TLSConfigError(f"sip.tls_key does not match sip.tls_cert: {exc}") from exc


def _chain_of(pem: bytes) -> list[object]:
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    return [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerContext:
    """A connection creator for ``listenSSL`` whose certificate can be swapped at run
    time: each handshake takes the context loaded last."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self._options = load_server_options(self.cert, self.key)
        self.loads = 1

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def reload(self) -> bool:
        """Load the files again; False (and the old certificate kept) when they fail."""
        try:
            options = load_server_options(self.cert, self.key)
        except TLSConfigError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self._options = options
        self.loads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


def client_context() -> ssl.CertificateOptions:
    """For connections we open to phones: TLS 1.2+, no peer verification (see above)."""
    return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
