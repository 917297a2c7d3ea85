"""DICOM TLS contexts for the SCP and the exporter, after BCP 195 (RFC 9325) and PS3.15 Annex B.

One policy for both directions (:func:`harden`): TLS 1.2 at least (1.3 preferred where the peer
has it), ECDHE key exchange with authenticated encryption only (AES-GCM or ChaCha20-Poly1305;
TLS 1.3's suites are all of that kind), no finite-field DHE (RFC 9325 section 4.1: SHOULD NOT
be negotiated), no compression, no renegotiation.

A context is built from files named in the config; a file that is missing or unreadable, a key
that does not match its certificate, or a CA file without certificates is a
:class:`~dicom_node.errors.ConfigError` naming the key and the file, raised when the node starts
(or when ``dicom-node send`` and ``echo`` run), never while a peer waits.
"""

import logging
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from dicom_node.config import Destination, Settings, TlsSettings
from dicom_node.errors import ConfigError

#: TLS 1.2 cipher suites, in OpenSSL's names: the four RFC 9325 section 4.2 recommends (ECDHE,
#: AES-GCM), then the two ECDHE ChaCha20-Poly1305 suites, which 4.2 does not list but which are
#: forward secret and AEAD too (peers without AES hardware prefer them). No DHE: section 4.1 says
#: SHOULD NOT. TLS 1.3 suites are set apart by OpenSSL and are all AEAD.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
logger = logging.getLogger(__name__)
#: A certificate that expires within this many days is warned about at the start.
EXPIRY_WARNING_DAYS = 30
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


def web_context(settings: Settings) -> ssl.SSLContext:
    """The web server's context (``web.tls``): the ``[tls]`` certificate and key under the same
    policy as DICOM TLS; no client certificate is asked (browsers and DICOMweb clients use the
    bearer token)."""
    tls: TlsSettings = settings.tls
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError(f"{settings.source}: web.tls = true needs 'tls.certificate' and 'tls.private_key'")
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.min_version)
    _load_chain(context, tls.certificate, tls.private_key, f"{settings.source}: key 'tls.certificate'")
    return context


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that leaves the reason of a failed client handshake on its context.

    pynetdicom swallows the error of its ``connect`` and reports only "no association"; the
    exporter reads the reason back from :attr:`ClientContext.failure`. Under TLS 1.3 the client's
    handshake ends before the server has checked the client's certificate: a refusal ("certificate
    required", "unknown ca") arrives as an alert on the first read, after ``connect`` returned,
    so reads record their TLS errors too (``recv`` and ``recv_into`` go through ``read``).
    """

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            self._record(exc)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # upstream's parameter names
        try:
            return super().read(len, buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # no failure: a non-blocking read found no whole record yet
        except ssl.SSLError as exc:
            self._record(exc)
            raise

    def _record(self, error: ssl.SSLError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:  # the first says why
            context.failure = describe(error)


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


def tls_args(tls: TlsSettings, destination: Destination, source: str) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``destination`` (the exporter's, ``send``'s,
    ``echo``'s and C-MOVE's): :func:`client_context` when it has ``tls = true``, else None."""
    return client_context(tls, destination, source) if destination.tls else None


def describe(error: BaseException) -> str:
    """Why a TLS handshake failed, in a few words (OpenSSL's reason; no peer data)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return (error.reason or str(error)).lower().replace("_", " ")
    return type(error).__name__


def check_files(settings: Settings, now: datetime | None = None) -> None:
    """Build every context the settings call for, so that a wrong file stops the start with a
    :class:`~dicom_node.errors.ConfigError` before anything listens or the data folder is taken.

    Warns (without stopping) about a private key that group or others may read, a certificate
    that has expired or expires within :data:`EXPIRY_WARNING_DAYS` days (at ``now``, default
    the current time), and a ``[tls]`` certificate that nothing uses.
    """
    used: list[tuple[str, Path, Path]] = []  # (key, certificate, private key) in use
    tls = settings.tls
    if "tls" in settings.node.listen:
        server_context(settings)
    web_tls = settings.web.enabled and settings.web.tls
    if web_tls:
        web_context(settings)
    for i, destination in enumerate(settings.destinations):
        if destination.tls:
            client_context(tls, destination, settings.source)
            if destination.tls_certificate and destination.tls_private_key:
                used.append((f"destinations[{i}].tls_certificate", destination.tls_certificate,
                             destination.tls_private_key))
    node_used = "tls" in settings.node.listen or web_tls or any(
        d.tls and d.tls_certificate is None for d in settings.destinations)
    if tls.certificate is not None and tls.private_key is not None and node_used:
        used.insert(0, ("tls.certificate", tls.certificate, tls.private_key))
    elif tls.certificate is not None and not web_tls and not any(d.tls for d in settings.destinations):
        # A warning, not an error: a certificate may be put in place before the switch. Nothing
        # goes out in clear because of it (destinations without tls = true are plain by choice).
        logger.warning("%s: key 'tls.certificate' is set but unused: 'node.listen' lacks \"tls\" "
                       "and no destination has 'tls = true'", settings.source)
    for key, certificate, private_key in used:
        _check_key_mode(settings.source, key, private_key)
        _check_expiry(settings.source, key, certificate, now or datetime.now(UTC))


def _check_key_mode(source: str, key: str, private_key: Path) -> None:
    """Warn when group or others may read or write ``private_key`` (a warning, not an error:
    mounted secrets are often read-only 0644 inside a container only the node runs in)."""
    mode = private_key.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("%s: key %r: private key %s has mode %04o (group or others have access); "
                       "expected 0600 or 0400", source, key.replace("certificate", "private_key"),
                       private_key, mode)


def _check_expiry(source: str, key: str, certificate: Path, now: datetime) -> None:
    """Warn about an expired certificate, or one that expires within EXPIRY_WARNING_DAYS."""
    try:
        not_after = certificate_not_after(certificate.read_text())
    except (ValueError, IndexError, OSError):  # OpenSSL loaded it: a date we cannot read is no reason to stop
        logger.warning("%s: key %r: the end of validity of certificate %s could not be read", source, key,
                       certificate)
        return
    left = not_after - now
    if left <= timedelta(0):
        logger.warning("%s: key %r: certificate %s expired on %s: peers will refuse it",
                       source, key, certificate, not_after.isoformat())
    elif left <= timedelta(days=EXPIRY_WARNING_DAYS):
        logger.warning("%s: key %r: certificate %s expires on %s, in %d days",
                       source, key, certificate, not_after.isoformat(), left.days)


def certificate_not_after(pem: str) -> datetime:
    """The end of validity of the first certificate in ``pem`` (UTC).

    Read from the DER (RFC 5280: tbsCertificate's version, serialNumber, signature, issuer,
    then validity), since :mod:`ssl` parses only a peer's certificate.
    """
    der = ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN CERTIFICATE-----"):])
    certificate = _der_children(der)[0][1]  # Certificate: tbsCertificate, algorithm, signature
    tbs = _der_children(_der_children(certificate)[0][1])
    fields = tbs[1:] if tbs[0][0] == 0xA0 else tbs  # [0] version is optional
    validity = _der_children(fields[3][1])
    tag, value = validity[1]
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280 4.1.2.5.1)
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _der_children(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) elements found one after another in ``data`` (a constructed value's
    content, or a whole DER encoding: its one top-level element)."""
    out, i = [], 0
    while i < len(data):
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
            count = length & 0x7F
            length = int.from_bytes(data[i:i + count], "big")
            i += count
        out.append((tag, data[i:i + length]))
        i += length
    return out
