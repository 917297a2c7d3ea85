"""DICOM TLS contexts for the SCP and the exporter, after BCP 195 (RFC 9325) and PS3.15 Annex B.

One policy for both directions (:func:`harden`): TLS 1.2 at least (1.3 preferred where the peer
has it), forward-secret key exchange with authenticated encryption only (ECDHE or DHE with
AES-GCM or ChaCha20-Poly1305; TLS 1.3's suites are all of that kind), no compression, no
renegotiation. This is PS3.15's "BCP195 RFC 9325 TLS Profile" set of cipher suites.

A context is built from files named in the config; a file that is missing or unreadable, a key
that does not match its certificate, or a CA file without certificates is a
:class:`~dicom_node.errors.ConfigError` naming the key and the file, raised when the node starts
(or when ``dicom-node send`` and ``echo`` run), never while a peer waits.
"""

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from dicom_node.config import Destination, Settings, TlsSettings
from dicom_node.errors import ConfigError

#: TLS 1.2 cipher suites allowed by RFC 9325 section 4.2 (recommended, forward secret, AEAD), in
#: OpenSSL's names; TLS 1.3 suites are set apart by OpenSSL and are all AEAD.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
ContextT = TypeVar("ContextT", bound=ssl.SSLContext)
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def harden(context: ContextT, min_version: str = "TLSv1.2") -> ContextT:
    """Apply the node's TLS policy to ``context`` (either side) and return it."""
    context.minimum_version = _VERSIONS[min_version]
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, where: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: file {exc.filename or certificate} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: certificate {certificate} and key {private_key} cannot be used: "
                          f"{_reason(exc)} (expected PEM files, the key unencrypted and matching)") from None


def _load_cas(context: ssl.SSLContext, cas: Sequence[Path], where: str) -> None:
    for path in cas:
        try:
            context.load_verify_locations(cafile=path)
        except FileNotFoundError:
            raise ConfigError(f"{where}: file {path} not found") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}: {path} holds no usable CA certificate: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The SCP's context: the node's certificate, and the CAs its clients' certificates must
    chain to (required unless ``tls.require_client_certificate`` is false)."""
    tls: TlsSettings = settings.tls
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError(f"{settings.source}: DICOM TLS needs 'tls.certificate' and 'tls.private_key'")
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.min_version)
    _load_chain(context, tls.certificate, tls.private_key, f"{settings.source}: key 'tls.certificate'")
    _load_cas(context, tls.ca_certificates, f"{settings.source}: key 'tls.ca_certificates'")
    if tls.ca_certificates:
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE  # config checks make this "no client certificate asked"
    return context


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that leaves the reason of a failed client handshake on its context.

    pynetdicom swallows the error of its ``connect`` and reports only "no association"; the
    exporter reads the reason back from :attr:`ClientContext.failure`.
    """

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            context = self.context
            if isinstance(context, ClientContext):
                context.failure = describe(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context that remembers why its last handshake failed (None: it did not)."""

    failure: str | None = None
    sslsocket_class = _RecordingSocket


def client_context(tls: TlsSettings, destination: Destination, source: str) -> tuple[ClientContext, str]:
    """The exporter's context for ``destination`` and the server name to check.

    The destination's own CAs, certificate and key win; otherwise the ``[tls]`` table's. The
    server's certificate is always verified against those CAs; its name is checked against
    ``tls_server_name`` (default: the destination's host) unless ``tls_check_hostname`` is false.
    Built per association, so renewed certificate files are picked up without a restart.
    """
    where = f"{source}: [[destinations]] {destination.name!r}"
    context = harden(ClientContext(ssl.PROTOCOL_TLS_CLIENT), tls.min_version)
    context.check_hostname = destination.tls_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_cas(context, destination.tls_ca_certificates or tls.ca_certificates,
              f"{where} key 'tls_ca_certificates'")
    certificate, key = destination.tls_certificate, destination.tls_private_key
    if certificate is None:
        certificate, key = tls.certificate, tls.private_key
    if certificate is not None and key is not None:
        _load_chain(context, certificate, key, f"{where} key 'tls_certificate'")
    return context, destination.tls_server_name or destination.host


def describe(error: BaseException) -> str:
    """Why a TLS handshake failed, in a few words (OpenSSL's reason; no peer data)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return (error.reason or str(error)).lower().replace("_", " ")
    return type(error).__name__


def check_files(settings: Settings) -> None:
    """Build every context the settings call for, so that a wrong file stops the start with a
    :class:`~dicom_node.errors.ConfigError` before anything listens or the data folder is taken."""
    if "tls" in settings.node.listen:
        server_context(settings)
    for destination in settings.destinations:
        if destination.tls:
            client_context(settings.tls, destination, settings.source)
