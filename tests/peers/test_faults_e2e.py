"""Never silent, through a real PACS: with every encoder failing, and then with highdicom's SR
constructor failing too, Orthanc still receives a "not analysed" SR for each series it sent."""

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.phantoms import write_study
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess
from tests.orthanc import Orthanc
from tests.peers.test_orthanc_e2e import node_config, orthanc_program, results_in  # noqa: F401

pytestmark = pytest.mark.peers


@pytest.mark.parametrize(("faults", "sop_class"), [
    ("encoders", "1.2.840.10008.5.1.4.1.1.88.34"),  # the full report: Comprehensive 3D SR
    ("encoders+highdicom", "1.2.840.10008.5.1.4.1.1.88.11"),  # the minimal one: Basic Text SR
])
def test_with_every_encoder_failing_orthanc_gets_a_not_analysed_report_per_series(
    tmp_path: Path, orthanc_program: str, faults: str, sop_class: str  # noqa: F811
) -> None:
    node = NodeProcess(tmp_path / "node", module="tests.peers.faulty_node", env={"FAULTY_NODE_FAULTS": faults})
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port))
    paths = [*write_study(tmp_path / "a", 1, seed=3_000_021, size=256, modality="CR"),
             *write_study(tmp_path / "b", 1, seed=3_000_022, size=256, modality="DX")]
    studies = sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths})
    assert len(studies) == 2
    with pacs, node:
        uploaded = [pacs.upload(p) for p in paths]
        job = pacs.post("/modalities/node/store",
                        {"Resources": sorted({u["ParentStudy"] for u in uploaded}), "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0

        def reports() -> dict[str, list[dict]]:
            return {uid: [pacs.get(f"/instances/{i['ID']}/simplified-tags") for i in results_in(pacs, uid)]
                    for uid in studies}
        wait_for(lambda: all(reports().values()), timeout=180, what="a report per series in Orthanc")
        for uid, tags in reports().items():
            assert [t["Modality"] for t in tags] == ["SR"], uid  # nothing but the report
            [instance] = results_in(pacs, uid)
            report = dcmread(_saved(pacs, instance["ID"], tmp_path))
            assert report.SOPClassUID == sop_class and report.StudyInstanceUID == uid
            texts = [str(e.value) for e in report.iterall() if e.keyword == "TextValue"]
            assert any("could not be encoded" in text for text in texts), texts


def _saved(pacs: Orthanc, instance_id: str, folder: Path) -> Path:
    path = folder / f"{instance_id}.dcm"
    path.write_bytes(pacs.get(f"/instances/{instance_id}/file", raw=True))
    return path
