"""Certificates for the TLS tests, made in the test with trustme: nothing is downloaded or kept."""

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Identity:
    """A PEM certificate (chain after it) and its unencrypted key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    """The node's CA and the identities it issued, and a second CA that nobody trusts."""

    ca: Path
    node: Identity  # serverAuth and clientAuth, for 127.0.0.1 and localhost
    client: Identity  # a modality's certificate from the node's CA
    stranger: Identity  # a certificate from another CA
    other_ca: Path


def _identity(ca: trustme.CA, folder: Path, name: str, key_type: trustme.KeyType) -> Identity:
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name, key_type=key_type)
    certificate, key = folder / f"{name}.pem", folder / f"{name}.key"
    for blob in issued.cert_chain_pems:
        with certificate.open("ab") as fh:
            fh.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)  # as an operator should (the node warns otherwise)
    return Identity(certificate, key)


def make_pki(folder: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> Pki:
    """Write a CA, the node's, a client's and a stranger's certificate under ``folder``.

    trustme's default keys are ECDSA; ``KeyType.RSA`` for tests of suites with RSA authentication.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="hospital", key_type=key_type)
    other = trustme.CA(organization_name="elsewhere", key_type=key_type)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return Pki(folder / "ca.pem", _identity(ca, folder, "node", key_type),
               _identity(ca, folder, "modality", key_type), _identity(other, folder, "stranger", key_type),
               folder / "other-ca.pem")
