"""The whole node over DICOM TLS, as a user runs it: storescu +tls sends a phantom study to the
node's TLS port, the demo model analyses it, and the exporter delivers the results to storescp
+tls; every result names the node and the model in its Contributing Equipment Sequence."""

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node import MANUFACTURER
from dicom_node.encode.common import derived_uid
from dicom_node.phantoms import write_study
from tests.conftest import require_tool
from tests.jobs.test_crash import wait_for
from tests.nodeproc import CONFIG, REPO, NodeProcess, free_port
from tests.tls.pki import make_pki
from tests.tls.test_export_tls import storescp_tls
from tests.tls.test_scp_tls import DCMTK_ENV, tls_options

pytestmark = pytest.mark.peers


def test_a_study_in_over_tls_and_its_results_out_over_tls(tmp_path: Path) -> None:
    storescu = require_tool("storescu", "dcmtk")
    pki = make_pki(tmp_path / "pki")
    paths = write_study(tmp_path / "study", 2, seed=3_000_002, size=512, modality="DX",
                        findings={"nodule": True})
    received = tmp_path / "pacs"
    with storescp_tls(received, pki.node, pki.ca) as pacs_port:
        tls_port = free_port()
        node_dir = tmp_path / "node"
        node_dir.mkdir()
        (node_dir / "node.toml").write_text(CONFIG.format(grace=5.0, web_port=free_port()).replace(
            'bind = "127.0.0.1"\n', 'bind = "127.0.0.1"\nlisten = ["plain", "tls"]\ninstitution_name = "Test Hospital"\n'
        ) + f"""
[tls]
port = {tls_port}
certificate = "{pki.node.certificate}"
private_key = "{pki.node.private_key}"
ca_certificates = ["{pki.ca}"]
[models]
dir = "{REPO / 'models'}"
[study]
stable_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.1
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
tls = true
[[pipelines]]
name = "chest"
model = "demo-cxr"
match = {{ modality = ["DX"] }}
outputs = ["sc", "sr"]
send_to = ["pacs"]
""")
        with NodeProcess(node_dir) as node:
            sent = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "XAI_NODE",
                                   *tls_options(pki.client, pki.ca), "127.0.0.1", str(tls_port),
                                   *map(str, paths)], capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
            assert sent.returncode == 0, sent.stderr

            def report_arrived() -> bool:
                return any(p.name.startswith("SR") for p in received.iterdir())

            wait_for(report_arrived, timeout=180, what="the node's SR at storescp +tls")
            assert node.stop() == 0
    objects = [dcmread(path) for path in sorted(received.iterdir())]
    device_uid = (node_dir / "data" / "device-uid").read_text().strip()
    assert device_uid.startswith("2.25.") and device_uid != derived_uid("device", "XAI_NODE")
    kinds = sorted(ds.SOPClassUID.name for ds in objects)
    assert kinds[-1] == "Secondary Capture Image Storage" and "Comprehensive 3D SR Storage" in kinds, kinds
    for ds in objects:
        [ours] = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER]
        assert ours.StationName == "XAI_NODE" and ours.InstitutionName == "Test Hospital"
        assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        # the installation's own Device UID, made at the first start, not one derived from the AE title
        assert ours.DeviceUID == device_uid, (ours.DeviceUID, device_uid)
    [report] = [ds for ds in objects if ds.Modality == "SR"]
    observer_uids = {str(element.value) for element in report.iterall() if element.keyword == "UID"}
    assert device_uid in observer_uids  # the SR's device observer is the same device
