"""DICOMweb against the real node: ``dicom-node serve`` in a child process, its web server on a
free port with a bearer token, Orthanc (with its DICOMweb plugin) as its PACS.

Through Orthanc's REST API only, Orthanc sends a phantom chest study to the node with STOW-RS;
the node analyses it as it would a C-STORE'd study and sends its results back to Orthanc by
C-STORE; Orthanc then finds the node's SR with QIDO-RS and retrieves it with WADO-RS. Then
dicomweb-client round-trips a study through the same running node. Node and Orthanc start once
for the module.
"""

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from dicom_node.audit import read_events
from dicom_node.phantoms import write_study
from tests.conftest import require_tool
from tests.factories import ct_dataset, new_uid
from tests.ingest.test_scp import _data_set_bytes
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess, pacs_config
from tests.orthanc import Orthanc, dicomweb_extra
from tests.peers.test_dcmtk import run_storescu

pytestmark = pytest.mark.peers
TOKEN = "e2e-dicomweb-token-0123456789"


@dataclass
class Setup:
    """The running node (``url`` is its DICOMweb root) and an Orthanc that knows it as
    DICOMweb server ``node`` and is the node's PACS."""

    node: NodeProcess
    url: str
    orthanc: Orthanc


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    program = require_tool("Orthanc", "orthanc")
    folder = tmp_path_factory.mktemp("dicomweb_e2e")
    node = NodeProcess(folder / "node")  # picks its web port now: Orthanc's config names it
    url = f"http://127.0.0.1:{node.web_port}/dicom-web"
    extra = dicomweb_extra({"node": (url, TOKEN)})
    with Orthanc(folder / "orthanc", program, {}, extra=extra) as orthanc:
        config = pacs_config(orthanc.dicom_port)
        node.config.write_text(node.config.read_text().replace("[web]\n", f'[web]\ntoken = "{TOKEN}"\n') + config)
        with node:
            yield Setup(node, url, orthanc)


def tags(orthanc: Orthanc, instance: str) -> dict[str, Any]:
    return dict(orthanc.get(f"/instances/{instance}/simplified-tags"))


def results_in_orthanc(orthanc: Orthanc, study: str, inputs: set[str]) -> dict[str, dict[str, Any]]:
    """Orthanc's instances of ``study`` that are not ``inputs`` (the node's results), by SOP
    Instance UID, with Orthanc's ID and Modality."""
    found = {}
    for instance in orthanc.instances_of_study(study):
        uid = instance["MainDicomTags"]["SOPInstanceUID"]
        if uid not in inputs:
            found[uid] = {"ID": instance["ID"], "Modality": tags(orthanc, instance["ID"])["Modality"]}
    return found


def first(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object."""
    return item[tag]["Value"][0]


def test_orthanc_stows_a_study_and_gets_the_results_by_dimse_qido_and_wado(setup: Setup,
                                                                          tmp_path: Path) -> None:
    orthanc, node = setup.orthanc, setup.node
    files = write_study(tmp_path / "cr", 1, seed=3_100_016, size=512, modality="CR",
                        findings={"nodule": True, "effusion": False})
    uploaded = [orthanc.upload(path) for path in files]
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    inputs = {path.stem for path in files}

    # the same image in another study, C-STORE'd: what a STOW'd study must be processed like
    twin = write_study(tmp_path / "twin", 1, seed=3_100_016, size=512, modality="CR",
                       findings={"nodule": True, "effusion": False}, study_uid=new_uid(), series_uid=new_uid())
    twin_study = str(dcmread(twin[0], stop_before_pixels=True).StudyInstanceUID)

    orthanc.stow("node", [uploaded[0]["ParentStudy"]])  # a. STOW-RS, Orthanc to the node
    run_storescu(node.port, [], twin)

    def sr_back(uid: str, sent: set[str]) -> bool:  # b. results come back by C-STORE from the outbox
        return "SR" in {r["Modality"] for r in results_in_orthanc(orthanc, uid, sent).values()}

    wait_for(lambda: sr_back(study, inputs), timeout=75, what="the node's SR of the STOW'd study in Orthanc")
    wait_for(lambda: sr_back(twin_study, {p.stem for p in twin}), timeout=30, what="the C-STORE'd twin's SR")
    results = results_in_orthanc(orthanc, study, inputs)
    assert len(results) >= 2  # the SR and at least the overlay of the positive finding
    [sr_uid] = [uid for uid, r in results.items() if r["Modality"] == "SR"]

    # c. QIDO-RS through Orthanc: the node's SR of the study
    found = orthanc.dicomweb_get("node", f"/studies/{study}/instances", {"Modality": "SR"})
    assert [first(item, "00080018") for item in found] == [sr_uid]
    assert first(found[0], "00080016") == tags(orthanc, results[sr_uid]["ID"])["SOPClassUID"]
    series = first(found[0], "0020000E")

    # d. WADO-RS through Orthanc: the SR's metadata, then the instance itself into Orthanc
    path = f"/studies/{study}/series/{series}/instances/{sr_uid}"
    [metadata] = orthanc.dicomweb_get("node", path + "/metadata")
    by_cstore = orthanc.get(f"/instances/{results[sr_uid]['ID']}/file", raw=True)
    held = dcmread(_as_file(tmp_path / "held.dcm", by_cstore))
    assert first(metadata, "00080018") == sr_uid
    assert first(metadata, "0020000D") == study and first(metadata, "0020000E") == series
    assert first(metadata, "0040A040") == held.ValueType == "CONTAINER"
    assert first(first(metadata, "0040A043"), "00080100") == held.ConceptNameCodeSequence[0].CodeValue
    orthanc.delete(f"/instances/{results[sr_uid]['ID']}")  # so that WADO-RS brings it back
    assert sr_uid not in results_in_orthanc(orthanc, study, inputs)
    orthanc.dicomweb_retrieve("node", [{"Study": study, "Series": series, "Instance": sr_uid}])
    again = results_in_orthanc(orthanc, study, inputs)
    by_wado = orthanc.get(f"/instances/{again[sr_uid]['ID']}/file", raw=True)
    retrieved = _as_file(tmp_path / "retrieved.dcm", by_wado)
    node_file = node.data_dir / "results" / study / series / f"{sr_uid}.dcm"
    # the same SR, byte for byte, by C-STORE and by WADO-RS, as the node holds it
    assert _data_set_bytes(retrieved) == _data_set_bytes(tmp_path / "held.dcm") == _data_set_bytes(node_file)

    _check_node_side(node, study, inputs, sr_uid, twin_study)


def _check_node_side(node: NodeProcess, study: str, inputs: set[str], sr_uid: str, twin: str) -> None:
    """The STOW'd instances were audited as received from ``STOW-RS`` and the job ran as the
    C-STORE'd ``twin`` study's did: one job of the chest pipeline, done, with the same steps,
    findings and kinds of output, its SR delivered."""
    trail = list(read_events(node.data_dir / "audit"))
    events = [e for e in trail if e.get("study_instance_uid") == study]
    stored = {e["sop_instance_uid"]: e for e in events if e["event"] == "instance_stored"}
    assert set(stored) >= inputs
    assert {stored[uid]["calling_ae_title"] for uid in inputs} == {"STOW-RS"}
    [received] = [e for e in events if e["event"] == "stow_received"]
    assert (received["stored"], received["failed"]) == (len(inputs), 0)
    [finished] = [e for e in events if e["event"] == "job_finished"]
    assert finished["pipeline"] == "chest" and sr_uid in finished["outputs"]
    assert "nodule" in finished["positives"]
    [twin_finished] = [e for e in trail if e.get("study_instance_uid") == twin and e["event"] == "job_finished"]
    for key in ("pipeline", "model", "model_version", "methods", "positives"):
        assert finished[key] == twin_finished[key], key
    assert set(finished["timings"]) == set(twin_finished["timings"])  # the same steps
    assert len(finished["outputs"]) == len(twin_finished["outputs"])
    assert any(e["event"] == "result_delivered" and e["sop_instance_uid"] == sr_uid for e in events)
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        jobs = conn.execute("SELECT pipeline, state FROM jobs WHERE study_instance_uid = ?", (study,)).fetchall()
    assert jobs == [("chest", "done")]


def _as_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_dicomweb_client_round_trips_through_the_running_node(setup: Setup, tmp_path: Path) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(setup.url, session=session)
    study, series = new_uid(), new_uid()
    datasets = [ct_dataset(study=study, series=series, seed=i) for i in range(3)]
    answer = client.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer

    assert [first(s, "0020000D") for s in client.search_for_studies(search_filters={"StudyInstanceUID": study})] \
        == [study]
    assert [first(s, "0020000E") for s in client.search_for_series(study)] == [series]
    sops = {ds.SOPInstanceUID for ds in datasets}
    assert {first(i, "00080018") for i in client.search_for_instances(study, series)} == sops

    retrieved = {ds.SOPInstanceUID: ds for ds in client.retrieve_study(study)}
    assert set(retrieved) == sops
    sent = datasets[0]
    assert retrieved[sent.SOPInstanceUID].PixelData == sent.PixelData
    metadata = client.retrieve_instance_metadata(study, series, sent.SOPInstanceUID)
    assert (first(metadata, "00080018"), first(metadata, "00280010"), first(metadata, "00280011")) \
        == (sent.SOPInstanceUID, sent.Rows, sent.Columns)
    assert "BulkDataURI" in metadata["7FE00010"]  # pixel data is fetched apart, as frames
    [frame] = client.retrieve_instance_frames(study, series, sent.SOPInstanceUID, frame_numbers=[1])
    assert frame == sent.PixelData

    unauthorised = DICOMwebClient(setup.url)
    with pytest.raises(requests.HTTPError) as refused:
        unauthorised.search_for_studies()
    assert refused.value.response.status_code == 401
