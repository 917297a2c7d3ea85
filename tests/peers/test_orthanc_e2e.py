"""The user's path against a real PACS: Orthanc sends a study to the node (REST
``/modalities/<node>/store``), the node classifies and explains it and sends SC overlays and a TID
1500 SR back into the same study; and what happens when the PACS is down, the node is killed, the
destination rejects us, or the model cannot analyse a series."""

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.phantoms import write_study
from dicom_node.phantoms.cross_section import cross_section
from tests.conftest import require_tool
from tests.encode.test_objects import document_evaluations
from tests.jobs.test_crash import wait_for
from tests.nodeproc import REPO, NodeProcess, pacs_config
from tests.orthanc import Orthanc
from tests.peers.test_dcmtk import run_storescu

pytestmark = pytest.mark.peers
KNOWN_FALSE_POSITIVE = "Missing attribute Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>"


EXPORT = """backoff_seconds = 0.3
max_backoff_seconds = 1
max_attempts = 2
poll_seconds = 0.2
timeout_seconds = 10"""


def node_config(pacs_port: int, pacs_aet: str = "ORTHANC", lime: bool = False) -> str:
    return pacs_config(pacs_port, '["gradcam", "lime"]' if lime else '["gradcam"]', pacs_aet, export=EXPORT)


@pytest.fixture
def orthanc_program() -> str:
    return require_tool("Orthanc", "orthanc")


def cr_study(folder: Path) -> list[Path]:
    return write_study(folder, 2, seed=3_000_002, size=512, modality="CR",
                       findings={"nodule": True, "effusion": True})


def ct_series(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        piece = cross_section(9, "CT", size=96, position=i)
        path = folder / f"ct{i}.dcm"
        piece.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def node_rows(node: NodeProcess, query: str) -> list[tuple]:
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        return conn.execute(query).fetchall()


def results_in(pacs: Orthanc, study_uid: str) -> list[dict]:
    return [i for i in pacs.instances_of_study(study_uid) if i["MainDicomTags"].get("SOPInstanceUID")
            and pacs.get(f"/instances/{i['ID']}/simplified-tags").get("Manufacturer") == "dicom-node"]


def expected_outputs(node: NodeProcess) -> set[str]:
    return {o["sop_instance_uid"] for (results,) in node_rows(node, "SELECT results FROM jobs")
            for o in json.loads(results).get("outputs", [])}


def delivered(node: NodeProcess) -> list[tuple]:
    return node_rows(node, "SELECT sop_instance_uid, state, attempts FROM outbox")


@pytest.fixture
def setup(tmp_path: Path, orthanc_program: str) -> Iterator[tuple[Orthanc, NodeProcess]]:
    node = NodeProcess(tmp_path / "node", extra_config="")
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port))
    with pacs, node:
        yield pacs, node


def test_orthanc_sends_a_study_and_gets_overlays_and_a_report_back(tmp_path: Path, setup: tuple) -> None:
    pacs, node = setup
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    cr, ct = cr_study(tmp_path / "cr"), ct_series(tmp_path / "ct")
    uploaded = [pacs.upload(p) for p in [*cr, *ct]]
    studies = sorted({u["ParentStudy"] for u in uploaded})
    job = pacs.post("/modalities/node/store", {"Resources": studies, "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0
    cr_uid = str(pydicom.dcmread(cr[0], stop_before_pixels=True).StudyInstanceUID)
    ct_uid = str(cross_section(9, "CT", size=96).dataset.StudyInstanceUID)

    def arrived() -> bool:
        expected = expected_outputs(node)
        got = {i["MainDicomTags"]["SOPInstanceUID"] for uid in (cr_uid, ct_uid) for i in results_in(pacs, uid)}
        return bool(expected) and len(node_rows(node, "SELECT id FROM jobs WHERE state IN ('done', 'failed')")) == 2 \
            and expected <= got
    wait_for(arrived, timeout=120, what="the node's results in Orthanc")

    [(results,)] = node_rows(node, "SELECT results FROM jobs WHERE pipeline = 'chest'")
    predictions = {p["sop_instance_uid"]: p for p in json.loads(results)["predictions"]}
    back = results_in(pacs, cr_uid)
    modalities = sorted(pacs.get(f"/instances/{i['ID']}/simplified-tags")["Modality"] for i in back)
    explained = len(json.loads(results)["explanations"])
    assert modalities == ["OT"] * explained + ["SR"]
    for instance in back:
        path = tmp_path / f"{instance['ID']}.dcm"
        path.write_bytes(pacs.get(f"/instances/{instance['ID']}/file", raw=True))
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, timeout=60, check=False)
        output = (check.stdout + check.stderr).decode("latin-1")
        assert not [line for line in output.splitlines()
                    if line.startswith("Error") and KNOWN_FALSE_POSITIVE not in line], output
        ds = pydicom.dcmread(path)
        if ds.Modality != "SR":
            continue
        report = hd.sr.srread(path)
        for group in report.content.get_planar_roi_measurement_groups() + report.content.get_image_measurement_groups():
            [probability] = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
            [evaluation] = [e for e in group.get_qualitative_evaluations()
                        if e.name.scheme_designator != "99DCMNODE"]  # not the verdicts
            source = (group.source_images[0].referenced_sop_instance_uid if hasattr(group, "source_images")
                      else group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            label = {"Nodule": "nodule", "Lung consolidation": "consolidation", "Pleural effusion": "effusion",
                     "Cardiomegaly": "cardiomegaly"}[evaluation.name.meaning]
            assert probability.value == pytest.approx(predictions[source]["probabilities"][label], abs=1e-6)
            assert (evaluation.value.meaning == "Present") == (label in predictions[source]["positives"])
        for item in document_evaluations(ds):  # findings without a region: absent or not explained
            [image] = [i for i in item.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "260753009"]
            source = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            label = {"Nodule": "nodule", "Lung consolidation": "consolidation", "Pleural effusion": "effusion",
                     "Cardiomegaly": "cardiomegaly"}[item.ConceptNameCodeSequence[0].CodeMeaning]
            assert (item.ConceptCodeSequence[0].CodeMeaning == "Present") == (
                label in predictions[source]["positives"])
    [ct_report] = results_in(pacs, ct_uid)  # the CT series could not be analysed by a chest X-ray model
    path = tmp_path / "ct_report.dcm"
    path.write_bytes(pacs.get(f"/instances/{ct_report['ID']}/file", raw=True))
    assert b"is meant for modalities ['CR', 'DX'], not 'CT'" in path.read_bytes()
    assert all(state == "delivered" and attempts == 1 for _, state, attempts in delivered(node))


def test_results_wait_while_the_pacs_is_down_and_arrive_once(tmp_path: Path, orthanc_program: str) -> None:
    node = NodeProcess(tmp_path / "node")
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port))
    cr = cr_study(tmp_path / "cr")
    with node:
        run_storescu(node.port, [], cr)  # Orthanc is not running yet
        wait_for(lambda: delivered(node) and all(a >= 2 for _, _, a in delivered(node)), timeout=120,
                 what="failed deliveries while the PACS is down")
        assert {state for _, state, _ in delivered(node)} == {"pending"}  # down is transient: never dead
        with pacs:
            wait_for(lambda: {s for _, s, _ in delivered(node)} == {"delivered"}, timeout=60,
                     what="delivery once the PACS is back")
            uid = str(pydicom.dcmread(cr[0], stop_before_pixels=True).StudyInstanceUID)
            arrived = [i["MainDicomTags"]["SOPInstanceUID"] for i in results_in(pacs, uid)]
    assert sorted(arrived) == sorted(expected_outputs(node))
    assert len(arrived) == len(set(arrived))


def test_a_node_killed_mid_pipeline_delivers_every_result_once(tmp_path: Path, orthanc_program: str) -> None:
    node = NodeProcess(tmp_path / "node")
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port, lime=True))
    cr = cr_study(tmp_path / "cr")
    with pacs:
        with node:
            run_storescu(node.port, [], cr)
            wait_for(lambda: node_rows(node, "SELECT state FROM jobs") == [("running",)], timeout=60,
                     what="the job to start")
            node.stop(signal.SIGKILL)
        with NodeProcess(tmp_path / "node") as again:
            wait_for(lambda: delivered(again) and {s for _, s, _ in delivered(again)} == {"delivered"}, timeout=120,
                     what="delivery after the restart")
            uid = str(pydicom.dcmread(cr[0], stop_before_pixels=True).StudyInstanceUID)
            arrived = [i["MainDicomTags"]["SOPInstanceUID"] for i in results_in(pacs, uid)]
            records = delivered(again)
    assert sorted(arrived) == sorted(uid for uid, _, _ in records)
    assert all(attempts == 1 for _, _, attempts in records)  # each sent once
    # the study's audit trail shows every step, from before the kill and after the restart
    shown = subprocess.run([sys.executable, "-m", "dicom_node", "audit", "--study", uid, "--json",
                            "--config", str(node.config)], capture_output=True, text=True, timeout=60,
                           check=True, cwd=REPO).stdout
    events = [json.loads(line) for line in shown.splitlines()]
    names = [e["event"] for e in events]
    assert names.count("instance_stored") == len(cr)
    assert names.count("job_started") == 2 and names.count("job_finished") == 1  # killed, then again
    finished = next(e for e in events if e["event"] == "job_finished")
    assert finished["weights_sha256"] and finished["methods"] == ["gradcam", "lime"]
    assert sorted(finished["outputs"]) == sorted(arrived)
    assert sorted(e["sop_instance_uid"] for e in events if e["event"] == "result_delivered") == sorted(arrived)
    trail = "".join(p.read_text() for p in (node.data_dir / "audit").glob("*.jsonl"))
    assert "association_accepted" in trail and "PHANTOM" not in trail  # UIDs only, no patient name or ID


def test_a_destination_that_rejects_us_ends_dead_and_the_cli_says_why(tmp_path: Path, orthanc_program: str) -> None:
    node = NodeProcess(tmp_path / "node")
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + node_config(pacs.dicom_port, pacs_aet="NOT_ORTHANC"))
    with pacs, node:
        run_storescu(node.port, [], cr_study(tmp_path / "cr"))
        wait_for(lambda: delivered(node) and {s for _, s, _ in delivered(node)} == {"dead"}, timeout=120,
                 what="dead records")
        shown = subprocess.run([sys.executable, "-m", "dicom_node", "outbox", "list", "--state", "dead",
                                "--config", str(node.config)], capture_output=True, text=True, timeout=60,
                               check=True, cwd=REPO).stdout
    assert "association rejected" in shown and "Called AE title not recognised" in shown.replace("recognized",
                                                                                                   "recognised")
