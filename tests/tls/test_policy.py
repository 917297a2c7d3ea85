"""The node's TLS policy (``tls.harden``) on the client side, against bare Python TLS servers:
no finite-field DHE (RFC 9325 section 4.1), ECDHE with AEAD only."""

import ssl
from pathlib import Path

import pytest
import trustme
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dicom_node.config import Destination, ExportSettings, TlsSettings
from dicom_node.export import DeliveryState, Exporter, Outbox, Result
from dicom_node.tls import TLS12_CIPHERS, harden
from tests.factories import ct_dataset
from tests.tls.peers import handshake, tls12_server_context, tls_server
from tests.tls.pki import Pki, make_pki

SC = str(SecondaryCaptureImageStorage)
DHE_ONLY = "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"


@pytest.fixture
def rsa_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", trustme.KeyType.RSA)  # DHE-RSA suites need an RSA certificate


def test_the_tls_1_2_suites_are_ecdhe_with_aead_only() -> None:
    for suite in TLS12_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite
    offered = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)).get_ciphers()
    tls12 = [c for c in offered if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12), tls12
    assert not [c["name"] for c in offered if "DHE" in c["name"] and not c["name"].startswith("ECDHE")]


def test_the_exporters_client_refuses_a_dhe_only_server(tmp_path: Path, rsa_pki: Pki) -> None:
    server = tls12_server_context(rsa_pki.node.certificate, rsa_pki.node.private_key, DHE_ONLY, tmp_path)
    with tls_server(server) as port:
        # the control: a client without the node's policy agrees a DHE suite with this server
        control = ssl.create_default_context(cafile=str(rsa_pki.ca))
        version, suite = handshake(port, control)
        assert version == "TLSv1.2" and suite.startswith("DHE-RSA-"), suite
        send = Exporter(Outbox(tmp_path / "db.sqlite"), [Destination("pacs", "PACS", "127.0.0.1", port, tls=True)],
                        ExportSettings(timeout_seconds=10), "XAI_NODE",
                        tls=TlsSettings(ca_certificates=(rsa_pki.ca,)), source="node.toml")
        send.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
        assert send.send_due() == 0
    [record] = send.outbox.list()
    assert record.state == DeliveryState.PENDING
    # no suite in common: the server's alert
    assert record.reason == "pacs: TLS handshake failed: sslv3 alert handshake failure", record.reason


def result(folder: Path) -> Result:
    """A Secondary Capture file to send."""
    ds = ct_dataset(size=16)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Result(ds.SOPInstanceUID, SC, ds.StudyInstanceUID, path)
