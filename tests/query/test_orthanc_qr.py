"""Orthanc, a real PACS, finds and retrieves from the node through its REST API: a query of the
node as a modality (``/modalities/xai/query``), then ``/queries/<id>/retrieve`` (a C-MOVE to
Orthanc), including "the AI SRs of this study" found by Concept Name Code Sequence."""

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom import Dataset

from tests.conftest import require_tool
from tests.jobs.test_crash import wait_for
from tests.nodeproc import free_port
from tests.orthanc import Orthanc
from tests.query.peers import QRNode, c_find, running_node

pytestmark = pytest.mark.peers
REPORT_TITLE = {"CodeValue": "126000", "CodingSchemeDesignator": "DCM"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QRNode, Orthanc]]:
    program = require_tool("Orthanc", "orthanc")
    folder = tmp_path_factory.mktemp("orthanc_qr")
    node_port = free_port()
    with Orthanc(folder / "orthanc", program, {"xai": ("XAI_NODE", node_port)}) as orthanc:
        destination = "\n".join(["[[destinations]]", 'name = "orthanc"', 'ae_title = "ORTHANC"',
                                 'host = "127.0.0.1"', f"port = {orthanc.dicom_port}"])
        yield from ((qr, orthanc) for qr in running_node(folder, destination, node_port))


def query(orthanc: Orthanc, level: str, keys: dict[str, Any], normalize: bool = True
          ) -> tuple[str, list[dict[str, Any]]]:
    """Ask the node through Orthanc; the query's id and its answers (simplified tags). Orthanc
    sends only its main tags of the level unless ``normalize`` is off."""
    made = orthanc.post("/modalities/xai/query", {"Level": level, "Query": keys, "Normalize": normalize})
    indexes = orthanc.get(f"{made['Path']}/answers")
    return made["ID"], [orthanc.get(f"{made['Path']}/answers/{i}/content") for i in indexes]


def test_orthanc_finds_and_retrieves_a_study_from_the_node(setup: tuple[QRNode, Orthanc]) -> None:
    qr, orthanc = setup
    study = qr.studies.uid["beta"]
    query_id, answers = query(orthanc, "Study", {"StudyInstanceUID": study, "PatientID": "", "StudyDate": "",
                                                 "AccessionNumber": ""})
    found = [{tag["Name"]: tag["Value"] for tag in answer.values()} for answer in answers]
    assert [(a["StudyInstanceUID"], a["AccessionNumber"]) for a in found] == [(study, "ACC-BETA")]
    orthanc.post(f"/queries/{query_id}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    inputs = set(qr.studies.inputs["beta"])
    wait_for(lambda: inputs <= {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study)},
             timeout=60, what="the study in Orthanc")
    modalities = {orthanc.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]
                  for i in orthanc.instances_of_study(study)}
    assert {"DX", "SR"} <= modalities  # the input and the node's own results


def test_orthanc_finds_the_ai_srs_of_a_study_and_retrieves_them_alone(setup: tuple[QRNode, Orthanc]) -> None:
    """Orthanc 1.10's REST query takes strings only (no sequence items) and drops sequences
    from the answers it keeps: it finds "the AI SRs of this study" by Modality and Verification
    Flag (sent with ``Normalize`` off), asks for Concept Name Code Sequence as an empty return
    key, and retrieves that answer alone. The node's answer to that very C-FIND carries the
    report's concept name (checked here with pynetdicom); matching on the sequence's items is
    driven by findscu in test_dcmtk_qr."""
    qr, orthanc = setup
    study = qr.studies.uid["alpha"]
    keys = {"StudyInstanceUID": study, "Modality": "SR", "VerificationFlag": "UNVERIFIED", "SeriesInstanceUID": "",
            "SOPInstanceUID": "", "SOPClassUID": "", "ConceptNameCodeSequence": ""}
    query_id, answers = query(orthanc, "Instance", keys, normalize=False)
    [report] = [{tag["Name"]: tag["Value"] for tag in answer.values()} for answer in answers]
    assert report["VerificationFlag"] == "UNVERIFIED"
    same = Dataset()
    for keyword, value in {**keys, "QueryRetrieveLevel": "IMAGE"}.items():
        setattr(same, keyword, [] if keyword.endswith("Sequence") else value)
    [answer] = c_find(qr.node.port, same)
    assert answer.SOPInstanceUID == report["SOPInstanceUID"]
    assert (answer.ConceptNameCodeSequence[0].CodeValue, answer.ConceptNameCodeSequence[0].CodingSchemeDesignator) \
        == (REPORT_TITLE["CodeValue"], REPORT_TITLE["CodingSchemeDesignator"])
    orthanc.post(f"/queries/{query_id}/answers/0/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    sent = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study)}
    assert report["SOPInstanceUID"] in sent
    assert not set(qr.studies.inputs["alpha"]) & sent  # only the report was asked for
