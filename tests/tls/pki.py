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


def _identity(ca: trustme.CA, folder: Path, name: str) -> Identity:
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    certificate, key = folder / f"{name}.pem", folder / f"{name}.key"
    for blob in issued.cert_chain_pems:
        with certificate.open("ab") as fh:
            fh.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    return Identity(certificate, key)


def make_pki(folder: Path) -> Pki:
    """Write a CA, the node's, a client's and a stranger's certificate under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(organization_name="hospital"), trustme.CA(organization_name="elsewhere")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return Pki(folder / "ca.pem", _identity(ca, folder, "node"), _identity(ca, folder, "modality"),
               _identity(other, folder, "stranger"), folder / "other-ca.pem")
