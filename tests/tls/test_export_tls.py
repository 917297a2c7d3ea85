"""The exporter and ``dicom-node send`` over DICOM TLS, to DCMTK's storescp +tls and to an Orthanc
with DicomTlsEnabled; certificates from trustme, made in each test."""

import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dicom_node.config import Destination, ExportSettings, Settings, TlsSettings
from dicom_node.errors import ConfigError
from dicom_node.export import DeliveryState, Exporter, Outbox, Result
from dicom_node.export.push import send_files
from dicom_node.ingest.scp import start_ingest
from dicom_node.store import InstanceStore
from tests.conftest import make_settings, require_tool
from tests.factories import ct_dataset
from tests.nodeproc import free_port
from tests.orthanc import Orthanc
from tests.tls.pki import Identity, Pki, make_pki

pytestmark = pytest.mark.peers

SC = str(SecondaryCaptureImageStorage)
SETTINGS = ExportSettings(max_attempts=3, backoff_seconds=10, timeout_seconds=10)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def node_tls(pki: Pki) -> TlsSettings:
    """The node's [tls]: its certificate (also its client certificate) and the CA it trusts."""
    return TlsSettings(certificate=pki.node.certificate, private_key=pki.node.private_key,
                       ca_certificates=(pki.ca,))


def result(folder: Path) -> Result:
    ds: Dataset = ct_dataset(size=16)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC  # a result the node made
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Result(ds.SOPInstanceUID, SC, ds.StudyInstanceUID, path)


@contextmanager
def storescp_tls(folder: Path, identity: Identity, ca: Path) -> Iterator[int]:
    """DCMTK's storescp on a free port, TLS only, requiring a client certificate from ``ca``."""
    program = require_tool("storescp", "dcmtk")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [program, "-aet", "PACS", "-od", str(folder), "+tls", str(identity.private_key),
         str(identity.certificate), "+cf", str(ca), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["ss", "-ltn", f"sport = :{port}"], capture_output=True, text=True
                             ).stdout.count("LISTEN") == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exporter(tmp_path: Path, destination: Destination, tls: TlsSettings) -> Exporter:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Exporter(Outbox(tmp_path / "db.sqlite"), [destination], SETTINGS, "XAI_NODE", tls=tls,
                    source="node.toml")


def test_the_exporter_delivers_to_storescp_over_tls(tmp_path: Path, pki: Pki) -> None:
    with storescp_tls(tmp_path / "received", pki.node, pki.ca) as port:
        send = exporter(tmp_path, Destination("pacs", "PACS", "127.0.0.1", port, tls=True), node_tls(pki))
        item = result(tmp_path / "results")
        send.outbox.enqueue(1, [item], ["pacs"])
        assert send.send_due() == 1
    [record] = send.outbox.list()
    assert record.state == DeliveryState.DELIVERED
    assert [p.name for p in (tmp_path / "received").iterdir()] == [f"SC.{item.sop_instance_uid}"]


def test_a_destination_whose_certificate_is_not_trusted_gets_nothing_and_the_record_says_why(
    tmp_path: Path, pki: Pki,
) -> None:
    with storescp_tls(tmp_path / "received", pki.stranger, pki.ca) as port:
        send = exporter(tmp_path, Destination("pacs", "PACS", "127.0.0.1", port, tls=True), node_tls(pki))
        send.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
        assert send.send_due() == 0
    [record] = send.outbox.list()
    assert record.state == DeliveryState.PENDING  # retried with backoff: a certificate can be mended
    assert "TLS handshake failed: certificate not accepted" in record.reason, record.reason
    assert not list((tmp_path / "received").iterdir())


def test_the_server_name_is_checked_unless_the_destination_says_otherwise(tmp_path: Path, pki: Pki) -> None:
    with storescp_tls(tmp_path / "received", pki.node, pki.ca) as port:
        wrong = Destination("pacs", "PACS", "127.0.0.1", port, tls=True, tls_server_name="pacs.example")
        send = exporter(tmp_path / "a", wrong, node_tls(pki))
        send.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
        assert send.send_due() == 0
        [record] = send.outbox.list()
        assert "certificate not accepted" in record.reason and "pacs.example" in record.reason, record.reason
        unchecked = exporter(tmp_path / "b", replace(wrong, tls_check_hostname=False), node_tls(pki))
        unchecked.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
        assert unchecked.send_due() == 1  # the chain is still verified (see the test above)


def test_dicom_node_send_uses_the_destinations_tls(tmp_path: Path, pki: Pki) -> None:
    with storescp_tls(tmp_path / "received", pki.node, pki.ca) as port:
        settings = Settings(source="node.toml", tls=node_tls(pki),
                            destinations=(Destination("pacs", "PACS", "127.0.0.1", port, tls=True),))
        item = result(tmp_path / "files")
        out = io.StringIO()
        assert send_files(settings, [item.path], "pacs", 10.0, out) == 0, out.getvalue()
        plain = io.StringIO()  # AET@HOST:PORT has no TLS settings: the TLS port refuses it
        assert send_files(settings, [item.path], f"PACS@127.0.0.1:{port}", 5.0, plain) == 1
    assert f"SC.{item.sop_instance_uid}" in [p.name for p in (tmp_path / "received").iterdir()]


def test_a_missing_certificate_file_fails_at_the_start_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    destination = Destination("pacs", "PACS", "127.0.0.1", 104, tls=True,
                              tls_ca_certificates=(tmp_path / "nowhere.pem",))
    with pytest.raises(ConfigError, match=r"node.toml: \[\[destinations\]\] 'pacs' key 'tls_ca_certificates'"):
        exporter(tmp_path, destination, node_tls(pki))


@pytest.fixture
def orthanc_program() -> str:
    return require_tool("Orthanc", "orthanc")


def test_the_exporter_delivers_to_an_orthanc_with_dicom_tls(tmp_path: Path, pki: Pki, orthanc_program: str) -> None:
    # Orthanc's one certificate serves as its server and its client certificate: trustme gives
    # both serverAuth and clientAuth. It requires the node's certificate (the default).
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {}, extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.node.certificate),
        "DicomTlsPrivateKey": str(pki.node.private_key), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    })
    with pacs:
        destination = Destination("pacs", "ORTHANC", "127.0.0.1", pacs.dicom_port, tls=True)
        send = exporter(tmp_path, destination, node_tls(pki))
        item = result(tmp_path / "results")
        send.outbox.enqueue(1, [item], ["pacs"])
        assert send.send_due() == 1
        assert [i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances_of_study(item.study_instance_uid)] \
            == [item.sop_instance_uid]
        # without the node's client certificate, Orthanc refuses
        anonymous = exporter(tmp_path / "anonymous", destination,
                             TlsSettings(ca_certificates=(pki.ca,)))
        other = result(tmp_path / "results")
        anonymous.outbox.enqueue(1, [other], ["pacs"])
        assert anonymous.send_due() == 0
        assert pacs.instances_of_study(other.study_instance_uid) == []
    [refused] = anonymous.outbox.list()
    # TLS 1.3: the refusal comes as an alert on the first read, after the client's handshake ended
    assert refused.reason.startswith("pacs: TLS handshake failed: "), refused.reason
    assert "certificate required" in refused.reason, refused.reason


def test_a_tls_1_3_refusal_of_the_nodes_client_certificate_reaches_the_record(tmp_path: Path, pki: Pki) -> None:
    """The node's own TLS listener as the destination: it requires a certificate from its CA.

    Under TLS 1.3 the client's handshake is over before the server checks the client's
    certificate, so ``connect`` succeeds and the refusal shows on the first read."""
    settings = replace(make_settings(tmp_path / "data"), node=replace(make_settings(tmp_path).node, listen=("tls",)),
                       tls=replace(node_tls(pki), port=0))
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store)
    try:
        destination = Destination("pacs", "XAI_NODE", "127.0.0.1", server.port, tls=True)
        cases = {"none": TlsSettings(ca_certificates=(pki.ca,)),
                 "another CA's": replace(node_tls(pki), certificate=pki.stranger.certificate,
                                         private_key=pki.stranger.private_key)}
        reasons = {}
        for name, tls in cases.items():
            send = exporter(tmp_path / name, destination, tls)
            send.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
            assert send.send_due() == 0
            [record] = send.outbox.list()
            reasons[name] = record.reason
        control = exporter(tmp_path / "control", destination, node_tls(pki))
        control.outbox.enqueue(1, [result(tmp_path / "results")], ["pacs"])
        assert control.send_due() == 1  # the node's own certificate is let in
    finally:
        server.stop(grace_seconds=1.0)
        store.close()
    assert reasons == {"none": "pacs: TLS handshake failed: tlsv13 alert certificate required",
                       "another CA's": "pacs: TLS handshake failed: tlsv1 alert unknown ca"}, reasons
