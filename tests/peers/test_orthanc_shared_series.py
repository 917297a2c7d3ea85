"""No cross-patient mix-up against a real PACS: Orthanc holds two patients' studies that share a
Series Instance UID and sends both to the node; every result that arrives in each study in
Orthanc is that study's: its patient, its images, its own findings."""

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.phantoms import write_study
from tests.encode.test_objects import document_evaluations
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess
from tests.orthanc import Orthanc
from tests.peers.test_orthanc_e2e import expected_outputs, node_rows, orthanc_program, results_in, setup

pytestmark = pytest.mark.peers
__all__ = ["orthanc_program", "setup"]  # fixtures used here
LABELS = {"Nodule": "nodule", "Lung consolidation": "consolidation", "Pleural effusion": "effusion",
          "Cardiomegaly": "cardiomegaly"}


def referenced(ds: pydicom.Dataset) -> set[str]:
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def sr_probabilities(path: Path) -> list[tuple[str, str, float]]:
    """(source image, finding, probability) of every measurement group of a TID 1500 report."""
    report = hd.sr.srread(path)
    found = []
    for group in report.content.get_planar_roi_measurement_groups() + report.content.get_image_measurement_groups():
        [probability] = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        [evaluation] = [e for e in group.get_qualitative_evaluations()
                        if e.name.scheme_designator != "99DCMNODE"]  # not the verdicts
        source = (group.source_images[0].referenced_sop_instance_uid if hasattr(group, "source_images")
                  else group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        found.append((str(source), LABELS[evaluation.name.meaning], float(probability.value)))
    for item in document_evaluations(pydicom.dcmread(path)):  # findings without a region
        [number] = [i for i in item.ContentSequence if i.ValueType == "NUM"]
        [image] = [i for i in item.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "260753009"]
        found.append((str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                      LABELS[item.ConceptNameCodeSequence[0].CodeMeaning],
                      float(number.MeasuredValueSequence[0].NumericValue)))
    return found


def test_two_patients_sharing_a_series_uid_each_get_only_their_own_results(
    tmp_path: Path, setup: tuple[Orthanc, NodeProcess]
) -> None:
    pacs, node = setup
    shared = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.1543.")
    alpha = write_study(tmp_path / "alpha", 1, seed=4_000_001, size=256, modality="CR", series_uid=shared,
                        findings={"nodule": True, "effusion": False})
    beta = write_study(tmp_path / "beta", 1, seed=4_000_101, size=256, modality="CR", series_uid=shared,
                       findings={"nodule": False, "effusion": True})
    studies = {}
    for name, paths in (("alpha", alpha), ("beta", beta)):
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        studies[str(headers[0].StudyInstanceUID)] = {
            "patient": str(headers[0].PatientID), "sources": {str(h.SOPInstanceUID) for h in headers}, "name": name}
    uploaded = [pacs.upload(p) for p in [*alpha, *beta]]
    resources = sorted({u["ParentStudy"] for u in uploaded})
    assert len(resources) == 2  # Orthanc keeps them apart (its IDs hash patient, study and series)
    sent = pacs.post("/modalities/node/store", {"Resources": resources, "Synchronous": True})
    assert sent.get("FailedInstancesCount", 0) == 0

    def arrived() -> bool:
        expected = expected_outputs(node)
        got = {i["MainDicomTags"]["SOPInstanceUID"] for uid in studies for i in results_in(pacs, uid)}
        finished = node_rows(node, "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'dead')")
        return len(finished) == 2 and bool(expected) and expected <= got
    wait_for(arrived, timeout=90, what="both studies' results in Orthanc")

    jobs = node_rows(node, "SELECT study_instance_uid, series_instance_uid, instance_uids, state, results FROM jobs")
    assert sorted(j[0] for j in jobs) == sorted(studies) and {j[1] for j in jobs} == {shared}
    made: dict[str, set[str]] = {}
    for study, instance_uids, state, results in ((j[0], j[2], j[3], j[4]) for j in jobs):
        own = studies[study]
        assert state == "done" and set(json.loads(instance_uids)) == own["sources"]
        found = json.loads(results)
        predicted = {p["sop_instance_uid"]: p for p in found["predictions"]}
        assert set(predicted) == own["sources"]
        back = results_in(pacs, study)
        outputs = {i["MainDicomTags"]["SOPInstanceUID"] for i in back}
        assert outputs == {o["sop_instance_uid"] for o in found["outputs"]}
        made[study] = outputs
        for instance in back:
            path = _fetch(pacs, instance["ID"], tmp_path)
            ds = pydicom.dcmread(path)
            assert (ds.StudyInstanceUID, ds.PatientID) == (study, own["patient"])
            refs = referenced(ds)
            assert refs & own["sources"] and refs <= own["sources"] | outputs, (own["name"], ds.Modality)
            if ds.Modality == "SR":  # its own findings: the probabilities its own job computed
                measured = sr_probabilities(path)
                assert {source for source, _, _ in measured} == own["sources"]
                for source, label, value in measured:
                    assert value == pytest.approx(predicted[source]["probabilities"][label], abs=1e-6)
    first, second = made.values()
    assert first and second and not first & second
    trail = "".join(p.read_text() for p in (node.data_dir / "audit").glob("*.jsonl"))
    shared_events = [json.loads(line) for line in trail.splitlines() if "series_uid_in_several_studies" in line]
    assert len(shared_events) == 1 and shared_events[0]["series_instance_uid"] == shared
    assert "PHANTOM" not in trail  # UIDs only


def _fetch(pacs: Orthanc, orthanc_id: str, folder: Path) -> Path:
    path = folder / f"{orthanc_id}.dcm"
    path.write_bytes(pacs.get(f"/instances/{orthanc_id}/file", raw=True))
    return path
